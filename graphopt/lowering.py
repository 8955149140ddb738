"""Lowering: hand the optimized graph to the target's backend, falling back to PyTorch per node."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from graphopt import targets
from graphopt.backends.base import Backend, Compiled
from graphopt.config import Config
from graphopt.errors import UnsupportedOpError
from graphopt.passes.base import count_call_nodes
from graphopt.passes.partition import PREFIX, partition_by_capability, unsupported_nodes
from graphopt.report import FallbackRecord, PartitionRecord, PassRecord, Report, op_histogram

log = logging.getLogger("graphopt")


def backend_for(cfg: Config) -> Backend:
    """The backend that lowers graphs for `cfg.target` (a line of `graphopt.targets.TARGETS`),
    after checking it can run here.

    Raises:
        RuntimeError: its optional dependency is missing, or this machine cannot run its code
            (no GPU, a cross-compiled target): one clear error before anything is compiled.
    """
    backend = targets.backend(cfg.target)
    backend.check_runs_here(cfg)
    return backend


class LoweredModule(torch.nn.Module):
    """A partition compiled by a backend, callable from the stitching FX graph."""

    def __init__(self, fn: Callable[..., Any], backend: str, single_output: bool):
        super().__init__()
        self.fn, self.backend, self.single_output = fn, backend, single_output

    def forward(self, *args: Any) -> Any:
        out = self.fn(*args)
        return out[0] if self.single_output else tuple(out)


def lower(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    cfg: Config,
    report: Report,
    *,
    training: bool = False,
) -> Callable[..., Any]:
    """Compile `gm` for `cfg.target`; returns a function of gm's placeholders."""
    backend = backend_for(cfg)
    start = time.perf_counter()
    try:
        if backend.registry.supports_all:
            backward = report.mode == "training-backward"
            try:
                compiled = backend.compile(
                    gm, list(example_inputs), cfg, training=training, backward=backward
                )
            except Exception as err:
                _fall_back_or_raise(cfg, report, "graph", gm, backend, err)
                return gm
            _record(report, "graph", gm, backend, compiled)
            return compiled.fn
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # partitions move real constants; backends build them
            return _lower_partitioned(gm, cfg, report, backend)
    finally:
        report.lowering_seconds += time.perf_counter() - start


def _record(
    report: Report, name: str, gm: torch.fx.GraphModule, backend: Backend, compiled: Compiled
) -> None:
    """The partition's line in the report, and the backend's warnings about it."""
    notes = [compiled.note, compiled.schedules]
    notes.append("loaded from the compile cache" if compiled.cache_hit else None)
    note = "; ".join(n for n in notes if n)
    report.partitions.append(
        PartitionRecord(name, backend.label, op_histogram(gm), count_call_nodes(gm), note=note)
    )
    for warning in compiled.warnings:
        log.warning("graphopt: %s: %s", report.graph_id, warning)
        report.warnings.append(warning)


def _lower_partitioned(
    gm: torch.fx.GraphModule, cfg: Config, report: Report, backend: Backend
) -> torch.fx.GraphModule:
    missing = unsupported_nodes(gm, backend.registry, cfg)
    if missing and cfg.fallback == "error":
        raise UnsupportedOpError(cfg.target, missing)
    report.fallbacks.extend(FallbackRecord(*m) for m in missing)
    before = count_call_nodes(gm)
    start = time.perf_counter()
    result = partition_by_capability(gm, cfg, backend.registry)
    split = result.gm
    report.passes.append(
        PassRecord(
            "partition_by_capability",
            before,
            count_call_nodes(split),
            result.modified,
            dict(result.stats),
            time.perf_counter() - start,
        )
    )
    for node in list(split.graph.nodes):
        if node.op != "call_module" or not node.target.startswith(PREFIX):
            continue
        sub: torch.fx.GraphModule = getattr(split, node.target)
        fakes = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in node.args]
        out = sub.graph.find_nodes(op="output")[0].args[0]
        single = not isinstance(out, tuple | list)
        try:
            compiled = backend.compile(sub, fakes, cfg)
        except Exception as err:
            _fall_back_or_raise(cfg, report, node.target, sub, backend, err)
            continue
        setattr(split, node.target, LoweredModule(compiled.fn, backend.label, single))
        _record(report, node.target, sub, backend, compiled)
    torch_ops = op_histogram(split)  # what stayed in the stitching graph runs in PyTorch
    torch_ops.pop("operator.getitem", None)
    if torch_ops:
        report.partitions.append(
            PartitionRecord(
                "(top level)",
                "torch",
                torch_ops,
                sum(torch_ops.values()),
                note="ops no backend rule covers, run eagerly",
            )
        )
    split.recompile()
    return split


def _fall_back_or_raise(
    cfg: Config,
    report: Report,
    name: str,
    gm: torch.fx.GraphModule,
    backend: Backend,
    err: Exception,
) -> None:
    """A piece the backend failed to compile runs in PyTorch (reported), or raises."""
    reason = f"{backend.label} failed to compile it: {type(err).__name__}: {_first_line(err)}"
    if cfg.fallback == "error":
        raise UnsupportedOpError(cfg.target, [(name, "partition", reason)]) from err
    log.warning("graphopt: %s runs in PyTorch: %s", name, reason)
    report.partitions.append(
        PartitionRecord(name, "torch", op_histogram(gm), count_call_nodes(gm), note=reason)
    )
    report.fallbacks.append(FallbackRecord(name, "partition", reason))


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""
