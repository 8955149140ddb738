"""The front half of every entry point that starts from a model: capture with torch.export,
calibration batches flattened like the captured graph's inputs, the pass pipeline, and the
report of it all.

`graphopt.optimize` hands the captured graph to `compiler.compile_graph` (pipeline, then
lowering); `export`, `prune`, `int8_program` and `distributed.pipeline` take the optimized
graph from `optimized_graph`. torch.compile's graphs come from dynamo instead
(`graphopt.backend`) and join at `compile_graph`. Calibration batches of any batch size are
re-batched to the graph's where the pipeline runs (`graphopt.calibration.fit_batches`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from graphopt.capture import CapturedGraph, capture_export
from graphopt.compiler import new_report, record_captured, record_optimized
from graphopt.config import Config
from graphopt.pipeline import run_pipeline
from graphopt.report import Report

log = logging.getLogger("graphopt")


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    report: Report,
    *,
    dynamic_shapes: Any = None,
    cfg: Config | None = None,
) -> CapturedGraph:
    """`model` captured by torch.export for `example_inputs` (a tensor or a tuple of
    positional inputs), the time it took recorded in `report`.

    Calibration batches (`cfg.calibration`) whose inputs differ from the example's in a dim
    other than the batch dim (a sequence length) cannot run through a graph traced static in
    that dim: without `dynamic_shapes`, such dims are captured dynamic (the report says so),
    so the calibration data runs through the graph that will run, and the result takes those
    sizes too. A different batch size needs nothing: it is re-batched
    (`graphopt.calibration`)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if dynamic_shapes is None and cfg is not None:
        dynamic_shapes = _calibration_dims(tuple(example_inputs), cfg, report)
    start = time.perf_counter()
    captured = capture_export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    report.capture_seconds = time.perf_counter() - start
    return captured


def _calibration_dims(example_inputs: tuple[Any, ...], cfg: Config, report: Report) -> Any:
    """A dynamic_shapes spec marking dynamic (Dim.AUTO) each dim > 0 of a top-level tensor input
    in which some calibration batch differs from the example; None if none differs."""
    if not cfg.needs_calibration or not isinstance(cfg.calibration, tuple):
        return None
    spec: list[dict[int, Any] | None] = []
    found = []
    for i, x in enumerate(example_inputs):
        dims = set()
        if isinstance(x, torch.Tensor):
            for batch in cfg.calibration:
                got = batch[i] if i < len(batch) else None
                if isinstance(got, torch.Tensor) and got.dim() == x.dim():
                    dims |= {d for d in range(1, x.dim()) if got.shape[d] != x.shape[d]}
        spec.append({d: torch.export.Dim.AUTO for d in sorted(dims)} or None)
        found += [f"dim {d} of input {i}" for d in sorted(dims)]
    if not found:
        return None
    message = (
        f"calibration batches differ from the example inputs in {', '.join(found)}: captured "
        "with those dims dynamic, so the calibration data runs through the graph that runs "
        "(which takes those sizes too)"
    )
    log.warning("graphopt: %s", message)
    report.warnings.append(message)
    return tuple(spec)


def calibration_batches(captured: CapturedGraph, cfg: Config) -> list[list[Any]] | None:
    """`cfg.calibration`'s batches (tuples of model inputs) flattened like the captured
    graph's placeholders; None when the options calibrate nothing or give a number of calls."""
    if not cfg.needs_calibration or not isinstance(cfg.calibration, tuple):
        return None
    return [captured.flat_inputs(batch) for batch in cfg.calibration]


def optimized_graph(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    cfg: Config,
    *,
    dynamic_shapes: Any = None,
    report: Report | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[CapturedGraph, torch.fx.GraphModule]:
    """(captured graph, graph after graphopt's passes) of `model`: nothing is lowered.

    `report`, if given, gets the passes and the params/FLOPs before and after; `say` gets one
    line per step (progress output). With `cfg.verify` every pass is checked on the example
    inputs.
    """
    say = say or (lambda message: None)
    report = report if report is not None else new_report(cfg)
    say(f"capturing {type(model).__name__} with torch.export")
    captured = capture(model, example_inputs, report, dynamic_shapes=dynamic_shapes, cfg=cfg)
    record_captured(captured.gm, report)
    calibration = calibration_batches(captured, cfg)
    if calibration is not None:
        say(f"quantizing to {cfg.quantize}, calibrating on {len(calibration)} batches")
    say("running graphopt's passes")
    start = time.perf_counter()
    gm = run_pipeline(
        captured.gm,
        cfg,
        report,
        real_inputs=captured.example_inputs if cfg.verify else None,
        calibration=calibration,
    )
    report.passes_seconds = time.perf_counter() - start
    record_optimized(gm, report)
    return captured, gm
