"""compile_graph: the one path from a frozen ATen graph to a callable, for both capture routes
(torch.compile's dynamo graphs and `graphopt.frontend`'s torch.export graphs)."""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch.utils._python_dispatch import _disable_current_modes

from graphopt.calibration import fit_batches
from graphopt.config import DEFAULT_CALIBRATION_CALLS, Config
from graphopt.errors import VerificationError
from graphopt.lowering import lower
from graphopt.pipeline import PIPELINE, lossy, run_graph, run_pipeline
from graphopt.report import Report, count_flops, count_params, count_weight_bytes
from graphopt.stages import lower_stages
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
    calibration: list[list[Any]] | None = None,
) -> Callable[..., Any]:
    """Run the pass pipeline on `gm`, lower it for `cfg.target`, and record it all in `report`.

    Args:
        example_inputs: values for gm's placeholders (fake under torch.compile, else real).
        real_inputs: real values for the placeholders; with `cfg.verify` every stage is
            compared on them with the captured graph (eager ATen) and a mismatch raises
            `VerificationError` naming the stage.
        training: a forward or backward graph of aot_autograd (weights are inputs).
        calibration: with `cfg.quantize`, batches of real values for gm's placeholders. None:
            the graph runs in float for its first N calls (N = cfg.calibration if it is a
            number, else 8), which become the calibration data, then it is quantized and
            lowered, and later calls run int8.
    """
    verify = cfg.verify and real_inputs is not None
    record_captured(gm, report)
    if calibration is not None:
        try:
            calibration = fit_batches(example_inputs, calibration)
        except ValueError as err:
            log.warning(
                "graphopt: %s: %s; calibrating on the first calls instead", report.graph_id, err
            )
            calibration = None
    quantizing = cfg.needs_calibration and not training
    if quantizing and calibration is None:
        REPORTS.append(report)
        return _CalibrateOnCalls(gm, example_inputs, cfg, report)
    # The lowering is checked against the captured graph, or, where a pass changes the numbers
    # on purpose (int8, pruning), against the graph it was built from (the float outputs
    # would only be thrown away).
    reference = run_graph(gm, list(real_inputs)) if verify and not lossy(cfg) else None
    start = time.perf_counter()
    gm = run_pipeline(
        gm,
        cfg,
        report,
        real_inputs=list(real_inputs) if verify else None,
        training=training,
        calibration=calibration,
    )
    report.passes_seconds = time.perf_counter() - start
    if verify and reference is None:  # before lowering, which may erase gm
        reference = run_graph(gm, list(real_inputs))
    compiled = _finish(gm, example_inputs, cfg, report, training=training)
    if verify:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():
            got = compiled(*real_inputs)
        # int8 and 16-bit graphs against the graph they were built from: kernels that fuse or
        # requantize differently move values by a rounding step, compared by relative error.
        rounded = "graphopt.quantization" in gm.meta or _low_precision(gm)
        problem = compare_outputs(reference, got, quantized=rounded)
        if problem is not None:
            raise VerificationError(f"lowering to {cfg.target}", problem)
        report.verified = True
    REPORTS.append(report)
    log.info("%s", report)
    _return_freed_memory()
    return compiled


def _low_precision(gm: torch.fx.GraphModule) -> bool:
    summary = gm.meta.get("graphopt.precision")
    return summary is not None and summary.applied


def record_captured(gm: torch.fx.GraphModule, report: Report) -> None:
    """Record in `report` the params, FLOPs and bytes of the graph before the passes."""
    report.params_before, report.flops_before = count_params(gm), count_flops(gm)
    report.weight_bytes_before = count_weight_bytes(gm)


def _finish(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    cfg: Config,
    report: Report,
    *,
    training: bool = False,
) -> Callable[..., Any]:
    """Record what the passes left, then lower."""
    record_optimized(gm, report)
    if training and cfg.sparsity > 0:
        _warn(
            report,
            "sparsity: pruning is for inference graphs (call under torch.no_grad()); "
            "this training graph is not pruned (graphopt.prune + recover fine-tune instead)",
        )
    if cfg.devices is not None:
        if not training:
            return lower_stages(gm, example_inputs, cfg, report)
        _warn(report, "devices: pipeline stages are for inference; this training graph runs whole")
    return lower(gm, example_inputs, cfg, report, training=training)


def _warn(report: Report, warning: str) -> None:
    log.warning("graphopt: %s: %s", report.graph_id, warning)
    report.warnings.append(warning)


def record_optimized(gm: torch.fx.GraphModule, report: Report) -> None:
    """Record in `report` the params, FLOPs, bytes and quantization the passes left in `gm`."""
    report.params_after, report.flops_after = count_params(gm), count_flops(gm)
    report.weight_bytes_after = count_weight_bytes(gm)
    report.quantization = gm.meta.get("graphopt.quantization")
    report.pruning = gm.meta.get("graphopt.pruning")
    report.precision = gm.meta.get("graphopt.precision")


class _CalibrateOnCalls:
    """int8 without calibration data: the first N calls run the float graph and are recorded;
    the Nth call quantizes with them and lowers, and later calls run the int8 code.

    The float graph runs op by op in PyTorch meanwhile (no compiled float version is built).
    """

    def __init__(
        self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config, report: Report
    ) -> None:
        split = next(i for i, step in enumerate(PIPELINE) if step.name == "quantize")
        self.cfg, self.report, self.example_inputs = cfg, report, list(example_inputs)
        self.calls = cfg.calibration if isinstance(cfg.calibration, int) else None
        if self.calls is None:
            self.calls = len(cfg.calibration) if cfg.calibration else DEFAULT_CALIBRATION_CALLS
        start = time.perf_counter()
        self.gm: torch.fx.GraphModule | None = run_pipeline(gm, cfg, report, steps=PIPELINE[:split])
        report.passes_seconds = time.perf_counter() - start
        self.rest = PIPELINE[split:]
        self.batches: list[list[Any]] = []
        self.compiled: Callable[..., Any] | None = None
        report.calibration_pending = self.calls
        log.warning(
            "graphopt: %s has no calibration data it can use: its first %d calls run in float "
            "and calibrate int8, later calls run int8",
            report.graph_id,
            self.calls,
        )

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            return self.compiled(*args)
        with torch.no_grad():
            out = self.gm(*args)
        self.batches.append(
            [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
        )
        self.report.calibration_pending = self.calls - len(self.batches)
        if len(self.batches) >= self.calls:
            with _disable_current_modes():  # aot_autograd checks its first call under a mode
                self._quantize_and_lower()
        return out

    def _quantize_and_lower(self) -> None:
        start = time.perf_counter()
        gm = run_pipeline(self.gm, self.cfg, self.report, steps=self.rest, calibration=self.batches)
        self.report.passes_seconds += time.perf_counter() - start
        last = self.batches[-1]
        # The int8 code against the int8 graph on the last call's inputs: the graph runs
        # first, as lowering may erase its weights (they live on in the compiled code).
        expected = run_graph(gm, last) if self.cfg.verify else None
        self.compiled = _finish(gm, self.example_inputs, self.cfg, self.report)
        if expected is not None:
            with torch.no_grad():
                problem = compare_outputs(expected, self.compiled(*last), quantized=True)
            if problem is not None:
                raise VerificationError(f"lowering to {self.cfg.target}", problem)
            self.report.verified = True
        self.batches, self.gm = [], None  # the float graph and its weights are done with
        log.info("graphopt: %s calibrated, now int8\n%s", self.report.graph_id, self.report)
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Give the heap that compiling used and freed back to the OS. glibc's malloc keeps it
    for reuse, so a process that compiled a large model would otherwise stay hundreds of MB
    above what it holds (benchmarks/llm.py's "peak after build" column measures a server's
    footprint after compiling)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; absent in musl
