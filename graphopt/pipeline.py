"""The pass pipeline: one ordered list, a reason beside each entry, and the runner.

Each pass is `verb_object(gm, cfg) -> PassResult`. The runner records what every pass did in
the report, writes the graph before/after each pass when GRAPHOPT_DUMP=dir is set, and with
`verify=True` re-runs the graph after each pass on the example inputs and names the first pass
that changed the numbers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from graphopt.config import Config, register_passes
from graphopt.errors import VerificationError
from graphopt.passes.base import PassResult, count_call_nodes
from graphopt.passes.cast_precision import cast_precision
from graphopt.passes.cse import eliminate_common_subexpressions
from graphopt.passes.dce import eliminate_dead_code
from graphopt.passes.decompose_fused_ops import decompose_fused_ops
from graphopt.passes.fold_batchnorm import fold_batchnorm
from graphopt.passes.fold_constants import fold_constants
from graphopt.passes.prune import prune
from graphopt.passes.quantize import quantize
from graphopt.passes.quantize_weights import MODES as LINEAR_MODES
from graphopt.passes.quantize_weights import quantize_weights
from graphopt.passes.remove_noops import remove_noops
from graphopt.passes.unbatch_shared_matmuls import unbatch_shared_matmuls
from graphopt.report import PassRecord, Report
from graphopt.testing import compare_outputs

log = logging.getLogger("graphopt")


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[[torch.fx.GraphModule, Config], PassResult]
    why: str
    training: bool  # safe when weights are trainable graph inputs (no frozen constants)
    applies: Callable[[Config], bool] | None = None  # runs only for such options (None: always)
    calibrated: bool = False  # takes the calibration batches (inputs for the placeholders)
    lossy: bool = False  # changes the numbers on purpose: verify re-bases after it


PIPELINE: list[Step] = [
    Step(
        "decompose_fused_ops",
        decompose_fused_ops,
        "first: fused fast-path kernels hide their matmuls from every pass and backend",
        training=True,
    ),
    Step(
        "remove_noops",
        remove_noops,
        "first: clones, identity views and eval dropout hide conv->bn patterns",
        training=True,
    ),
    Step(
        "fold_batchnorm",
        fold_batchnorm,
        "before fold_constants: rewrites BN into weight arithmetic that folding precomputes",
        training=False,
    ),
    Step(
        "fold_constants",
        fold_constants,
        "precompute everything that depends only on frozen weights",
        training=False,
    ),
    Step(
        "unbatch_shared_matmuls",
        unbatch_shared_matmuls,
        "after folding (the weight is one constant): a Linear on a non-contiguous 3-d input "
        "is a bmm by an expanded weight; as a mm, quantize and prune see the layer",
        training=False,
    ),
    Step(
        "eliminate_common_subexpressions",
        eliminate_common_subexpressions,
        "after folding: folded constants expose more identical expressions",
        training=True,
    ),
    Step(
        "prune",
        prune,
        "after BN and constant folding (each layer's weight is one constant, BN scale in it); "
        "before quantize, which calibrates the pruned graph",
        training=False,
        applies=lambda cfg: cfg.sparsity > 0,
        lossy=True,
    ),
    Step(
        "cast_precision",
        cast_precision,
        "after folding and pruning (each weight is one final constant, converted once); its "
        "float32 original is then dropped by DCE",
        training=False,
        applies=lambda cfg: cfg.dtype != "float32",
        lossy=True,
    ),
    Step(
        "quantize",
        quantize,
        "after BN folding and constant folding: quantizes the final weights, calibrated on "
        "the graph that will run; before DCE, which drops the float weights it replaced",
        training=False,
        applies=lambda cfg: cfg.quantize == "int8",
        calibrated=True,
        lossy=True,
    ),
    Step(
        "quantize_weights",
        quantize_weights,
        "after constant folding (each linear's weight is one constant); int8/int4 weights "
        "for large models (calibration only for SmoothQuant); before DCE, which drops the "
        "float weights",
        training=False,
        applies=lambda cfg: cfg.quantize in LINEAR_MODES,
        calibrated=True,
        lossy=True,
    ),
    Step(
        "eliminate_dead_code",
        eliminate_dead_code,
        "last: drop nodes and constants the rewrites orphaned",
        training=True,
    ),
]


register_passes(step.name for step in PIPELINE)


def lossy(cfg: Config) -> bool:
    """Whether a pass that changes the numbers on purpose runs for these options."""
    return any(s.lossy and (s.applies is None or s.applies(cfg)) for s in PIPELINE)


class _Dumper:
    """Writes graphs to $GRAPHOPT_DUMP/<graph>/NN_<stage>.txt (debugging aid)."""

    def __init__(self, graph_id: str):
        root = os.environ.get("GRAPHOPT_DUMP")
        self.dir = Path(root) / graph_id if root else None
        self.count = 0
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, stage: str, gm: torch.fx.GraphModule) -> None:
        if self.dir is None:
            return
        text = gm.print_readable(print_output=False, include_stride=False, include_device=False)
        (self.dir / f"{self.count:02d}_{stage}.txt").write_text(text)
        self.count += 1


def run_graph(gm: torch.fx.GraphModule, inputs: list[Any]) -> Any:
    """Run a graph on real inputs outside any active fake mode."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        return gm(*inputs)


def _fitted(gm: torch.fx.GraphModule, calibration: list[list[Any]]) -> list[list[Any]]:
    """The calibration batches re-batched for gm's traced input shapes (as they are where a
    placeholder has no traced value to compare with)."""
    from graphopt.calibration import fit_batches

    traced = [node.meta.get("val") for node in gm.graph.find_nodes(op="placeholder")]
    if any(value is None for value in traced):
        return calibration
    return fit_batches(traced, calibration)


def run_pipeline(
    gm: torch.fx.GraphModule,
    cfg: Config,
    report: Report,
    *,
    real_inputs: list[Any] | None = None,
    training: bool = False,
    calibration: list[list[Any]] | None = None,
    steps: list[Step] | None = None,
) -> torch.fx.GraphModule:
    """Run every enabled pipeline pass on `gm` and record each in `report`.

    Args:
        real_inputs: real values for gm's placeholders; needed by `cfg.verify`.
        training: run only the passes that are safe when weights are graph inputs.
        calibration: batches of real values for gm's placeholders (for `calibrated` steps),
            of any batch size: re-batched to the graph's (`graphopt.calibration`).
        steps: a slice of PIPELINE to run (default: all of it).
    """
    if calibration is not None:
        calibration = _fitted(gm, calibration)
    dump = _Dumper(report.graph_id)
    dump("captured", gm)
    reference = None
    if cfg.verify and real_inputs is not None:
        reference = run_graph(gm, real_inputs)
    done: list[str] = []
    for step in PIPELINE if steps is None else steps:
        if step.name in cfg.disable_passes or (training and not step.training):
            continue
        if step.applies is not None and not step.applies(cfg):
            continue
        before = count_call_nodes(gm)
        start = time.perf_counter()
        try:
            # Passes see real constants: under torch.compile dynamo's fake mode is active.
            with unset_fake_temporarily():
                if step.calibrated:
                    result = step.fn(gm, cfg, calibration)
                else:
                    result = step.fn(gm, cfg)
            result.gm.graph.lint()
        except Exception as err:
            ran = ", ".join(done) or "none"
            raise RuntimeError(
                f"graphopt pass {step.name!r} failed (passes run before it: {ran}): {err}"
            ) from err
        gm = result.gm
        if result.modified:
            gm.recompile()
        seconds = time.perf_counter() - start
        record = PassRecord(
            step.name, before, count_call_nodes(gm), result.modified, dict(result.stats), seconds
        )
        report.passes.append(record)
        log.info("graphopt: %s", record.summary())
        dump(step.name, gm)
        done.append(step.name)
        if reference is not None and result.modified and step.lossy:
            reference = run_graph(gm, real_inputs)  # later passes must keep *these* numbers
        elif reference is not None and result.modified:
            problem = compare_outputs(reference, run_graph(gm, real_inputs))
            if problem is not None:
                raise VerificationError(step.name, problem)
    return gm
