"""compile_graph: the one path from a frozen ATen graph to a callable, for both capture routes."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from graphopt.config import Config
from graphopt.errors import VerificationError
from graphopt.lowering import lower
from graphopt.pipeline import run_graph, run_pipeline
from graphopt.report import Report, count_flops, count_params
from graphopt.testing import compare_outputs

log = logging.getLogger("graphopt")

_ids = itertools.count()
REPORTS: list[Report] = []  # every graph compiled in this process, oldest first


def new_report(cfg: Config, mode: str = "inference") -> Report:
    return Report(
        graph_id=f"graph{next(_ids)}", target=cfg.target, options=cfg.describe(), mode=mode
    )


def compile_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    cfg: Config,
    report: Report,
    *,
    real_inputs: Sequence[Any] | None = None,
    training: bool = False,
) -> Callable[..., Any]:
    """Run the pass pipeline on `gm`, lower it for `cfg.target`, and record it all in `report`.

    Args:
        example_inputs: values for gm's placeholders (fake under torch.compile, else real).
        real_inputs: real values for the placeholders; with `cfg.verify` every stage is
            compared on them with the captured graph (eager ATen) and a mismatch raises
            `VerificationError` naming the stage.
        training: a forward or backward graph of aot_autograd (weights are inputs).
    """
    verify = cfg.verify and real_inputs is not None
    reference = run_graph(gm, list(real_inputs)) if verify else None
    report.params_before, report.flops_before = count_params(gm), count_flops(gm)
    start = time.perf_counter()
    gm = run_pipeline(
        gm, cfg, report, real_inputs=list(real_inputs) if verify else None, training=training
    )
    report.passes_seconds = time.perf_counter() - start
    report.params_after, report.flops_after = count_params(gm), count_flops(gm)
    compiled = lower(gm, example_inputs, cfg, report, training=training)
    if verify:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():
            got = compiled(*real_inputs)
        problem = compare_outputs(reference, got)
        if problem is not None:
            raise VerificationError(f"lowering to {cfg.target}", problem)
        report.verified = True
    REPORTS.append(report)
    log.info("%s", report)
    return compiled
