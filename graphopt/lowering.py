"""Lowering: hand the optimized graph to the target's backend, falling back to PyTorch per node."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from graphopt.backends.registry import OpRegistry
from graphopt.config import Config
from graphopt.errors import UnsupportedOpError
from graphopt.passes.base import count_call_nodes
from graphopt.passes.partition import PREFIX, partition_by_capability, unsupported_nodes
from graphopt.report import FallbackRecord, PartitionRecord, PassRecord, Report, op_histogram

log = logging.getLogger("graphopt")


@dataclass(frozen=True)
class Backend:
    name: str
    registry: OpRegistry
    compile: Callable[..., Callable[..., Any]]  # (gm, example_inputs, cfg) -> callable


def backend_for(target: str) -> Backend:
    """The backend that lowers graphs for `target` (see Config.target)."""
    if target == "cpu":
        from graphopt.backends.inductor import INDUCTOR, compile_inductor

        return Backend("inductor", INDUCTOR, compile_inductor)
    if target == "aarch64":
        raise NotImplementedError(
            "target='aarch64' cross-compiles for an ARM device: it cannot run on this host "
            "through torch.compile or graphopt.optimize; write the ARM library with "
            "graphopt.export(model, inputs, out_dir, format='tvm', target='aarch64'). "
            "Targets that run here: 'cpu', 'llvm', 'cuda', 'onnx', 'hls' (C simulation)"
        )
    if target == "onnx":
        try:
            from graphopt.backends.onnx import ONNX, compile_onnx
        except ImportError as err:
            raise RuntimeError(
                f"target='onnx' needs onnx and onnxruntime: pip install 'graphopt[onnx]' ({err})"
            ) from err
        return Backend("onnxruntime", ONNX, compile_onnx)
    if target in ("llvm", "cuda"):
        try:
            from graphopt.backends.tvm import TVM, compile_subgraph
        except ImportError as err:
            raise RuntimeError(
                f"target={target!r} needs Apache TVM: pip install 'graphopt[tvm]' ({err})"
            ) from err
        from graphopt.backends.tvm.lower import runtime_device

        runtime_device(Config(target=target))  # no GPU: one clear error, not a fallback per piece
        return Backend(f"tvm-{target}", TVM, compile_subgraph)
    if target == "hls":
        from graphopt.backends.hls import HLS, compile_hls

        return Backend("hls-csim", HLS, compile_hls)
    raise NotImplementedError(
        f"target={target!r} is accepted by Config but its backend is not implemented yet; "
        "implemented targets: 'cpu', 'llvm', 'cuda', 'onnx', 'hls'"
    )


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
    backend = backend_for(cfg.target)
    start = time.perf_counter()
    if backend.name == "inductor":
        from graphopt.passes.quantize import onednn_saturation_warning

        warning = onednn_saturation_warning(gm)
        if warning is not None:
            log.warning("graphopt: %s: %s", report.graph_id, warning)
            report.warnings.append(warning)
    try:
        if backend.registry.supports_all:
            kwargs = {}
            if backend.name == "inductor":
                kwargs = {"training": training, "backward": report.mode == "training-backward"}
            try:
                fn = backend.compile(gm, list(example_inputs), cfg, **kwargs)
            except Exception as err:
                _fall_back_or_raise(cfg, report, "graph", gm, backend, err)
                return gm
            report.partitions.append(
                PartitionRecord(
                    "graph",
                    backend.name,
                    op_histogram(gm),
                    count_call_nodes(gm),
                    note=getattr(fn, "note", ""),
                )
            )
            return fn
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # partitions move real constants; backends build them
            return _lower_partitioned(gm, cfg, report, backend)
    finally:
        report.lowering_seconds += time.perf_counter() - start


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
            fn = backend.compile(sub, fakes, cfg)
        except Exception as err:
            _fall_back_or_raise(cfg, report, node.target, sub, backend, err)
            continue
        setattr(split, node.target, LoweredModule(fn, backend.name, single))
        notes = [getattr(fn, "schedules", None)]
        notes.append("loaded from the compile cache" if getattr(fn, "cache_hit", False) else None)
        note = "; ".join(n for n in notes if n)
        report.partitions.append(
            PartitionRecord(
                node.target, backend.name, op_histogram(sub), count_call_nodes(sub), note=note
            )
        )
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
    reason = f"{backend.name} failed to compile it: {type(err).__name__}: {_first_line(err)}"
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
