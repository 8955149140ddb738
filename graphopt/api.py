"""`graphopt.optimize`: the export-path front door (torch.export -> passes -> lowering)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from graphopt.capture import CapturedGraph, capture_export
from graphopt.compiler import compile_graph, new_report
from graphopt.config import Config
from graphopt.errors import VerificationError
from graphopt.report import Report
from graphopt.testing import compare_outputs


class OptimizedModule(torch.nn.Module):
    """The optimized model: call it like the original. `.report` says what graphopt did."""

    def __init__(self, compiled: Any, captured: CapturedGraph, report: Report, cfg: Config):
        super().__init__()
        self._compiled = compiled
        self._in_spec, self._out_spec = captured.in_spec, captured.out_spec
        self.graph_module = captured.gm
        self.report = report
        self.config = cfg

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = pytree.tree_flatten((args, kwargs))
        if self._in_spec is not None and spec != self._in_spec:
            raise TypeError(f"optimized model was captured for inputs {self._in_spec}, got {spec}")
        out = self._compiled(*flat)
        if self._out_spec is None:
            return out
        return pytree.tree_unflatten(list(out), self._out_spec)


def optimize(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    dynamic_shapes: Any = None,
    **options: Any,
) -> OptimizedModule:
    """Optimize `model` for its example inputs and return a module that runs the result.

    Args:
        model: an nn.Module in eval mode (weights and buffers are frozen into the graph).
        example_inputs: a tuple of example positional inputs.
        dynamic_shapes: as in torch.export.export, e.g. {"x": {0: torch.export.Dim("batch")}}.
        **options: fields of `graphopt.Config` (target, quantize, calibration, verify, ...).
            `calibration` batches are tuples of positional inputs like `example_inputs`.

    Returns:
        An `OptimizedModule` with `.report` (per pass, per partition, params and FLOPs).
    """
    cfg = Config.from_options(options)
    report = new_report(cfg)
    start = time.perf_counter()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    captured = capture_export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    report.capture_seconds = time.perf_counter() - start
    # Lower for the traced (fake, possibly symbolic) inputs so dynamic dims stay dynamic.
    traced_inputs = [n.meta["val"] for n in captured.gm.graph.find_nodes(op="placeholder")]
    calibration = None
    if cfg.quantize is not None and isinstance(cfg.calibration, tuple):
        calibration = [captured.flat_inputs(batch) for batch in cfg.calibration]
    compiled = compile_graph(
        captured.gm,
        traced_inputs,
        cfg,
        report,
        real_inputs=captured.example_inputs,
        calibration=calibration,
    )
    optimized = OptimizedModule(compiled, captured, report, cfg)
    if cfg.verify and cfg.quantize is None:  # int8 was checked against its own graph
        with torch.no_grad():
            problem = compare_outputs(model(*example_inputs), optimized(*example_inputs))
        if problem is not None:
            raise VerificationError("whole model (export capture)", problem)
    return optimized
