"""What graphopt did to a graph: per pass, per partition, and totals (params, FLOPs)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx

from graphopt.ops import op_name


@dataclass
class PassRecord:
    name: str
    nodes_before: int
    nodes_after: int
    modified: bool
    stats: dict[str, int]
    seconds: float

    def summary(self) -> str:
        what = ", ".join(f"{k}={v}" for k, v in self.stats.items() if v) or "no change"
        return f"{self.name}: {self.nodes_before} -> {self.nodes_after} nodes ({what})"


@dataclass
class PartitionRecord:
    name: str
    target: str  # the backend that runs it ("inductor", "tvm-llvm", "torch" for fallback ...)
    ops: dict[str, int]
    nodes: int
    note: str = ""


@dataclass
class FallbackRecord:
    node: str
    op: str
    reason: str


@dataclass
class StageRecord:
    """One pipeline stage (`devices=[...]`), as the cost model planned it."""

    device: str
    backend: str
    nodes: int
    flops: int
    weight_bytes: int
    bytes_in: int  # crossing the cut into this stage
    compute_seconds: float
    transfer_seconds: float
    fallback_ops: list[str]  # ops its device's backend lacks, run in PyTorch there


@dataclass
class StagesRecord:
    """The pipeline stages and their imbalance (slowest / mean stage time; 1.0 is even)."""

    imbalance: float
    stages: list[StageRecord]

    def __str__(self) -> str:
        lines = [f"{len(self.stages)} stages, imbalance {self.imbalance:.3f} (slowest / mean)"]
        for i, s in enumerate(self.stages):
            by = f" ({s.backend})" if s.backend else ""
            lines.append(
                f"  stage {i} on {s.device}{by}: {s.nodes} nodes, "
                f"{s.flops / 1e6:.1f} MFLOP, weights {s.weight_bytes / 1e6:.2f} MB, "
                f"{s.bytes_in / 1e3:.1f} kB in, "
                f"{s.compute_seconds * 1e3:.3f} ms + {s.transfer_seconds * 1e3:.3f} ms transfer"
            )
            if s.fallback_ops:
                lines.append(
                    f"    {len(s.fallback_ops)} op(s) its backend lacks run in PyTorch on "
                    f"{s.device}: {', '.join(sorted(set(s.fallback_ops)))}"
                )
        return "\n".join(lines)


@dataclass
class Report:
    """Filled in while a graph is compiled: data (`to_dict()`, `to_json()` keep every record
    structured); `str(report)` renders it as a readable table."""

    graph_id: str
    target: str
    options: dict[str, Any] = field(default_factory=dict)
    mode: str = "inference"  # or "training-forward" / "training-backward"
    passes: list[PassRecord] = field(default_factory=list)
    partitions: list[PartitionRecord] = field(default_factory=list)
    fallbacks: list[FallbackRecord] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    capture_seconds: float = 0.0
    passes_seconds: float = 0.0
    lowering_seconds: float = 0.0
    verified: bool | None = None
    # a graphopt.passes.quantize.QuantSummary (quantize="int8") or a
    # graphopt.quantized_linear.WeightOnlySummary (the weight-only modes)
    quantization: Any = None
    pruning: Any = None  # a graphopt.passes.prune.PruneSummary when sparsity > 0
    precision: Any = None  # a graphopt.passes.cast_precision.PrecisionSummary with dtype=
    calibration_pending: int | None = None  # int8 calibration calls still to come
    stages: StagesRecord | None = None  # with devices=[...]: the pipeline stages
    stages_svg: str | None = None  # with devices=[...]: the split graph as an SVG picture
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        lines = [f"graphopt report: graph {self.graph_id} ({self.mode}), target={self.target!r}"]
        lines.append(f"  {'pass':<34}{'nodes':>15}  {'seconds':>8}  changes")
        for p in self.passes:
            what = ", ".join(f"{k}={v}" for k, v in p.stats.items() if v) or "-"
            nodes = f"{p.nodes_before} -> {p.nodes_after}"
            lines.append(f"  {p.name:<34}{nodes:>15}  {p.seconds:>8.3f}  {what}")
        lines.append(f"  {'partition':<20}{'runs on':<14}{'nodes':>6}  ops")
        for part in self.partitions:
            ops = ", ".join(
                f"{k.split('.')[1] if '.' in k else k}x{v}"
                for k, v in sorted(part.ops.items(), key=lambda kv: -kv[1])[:8]
            )
            more = " ..." if len(part.ops) > 8 else ""
            note = f"  [{part.note}]" if part.note else ""
            lines.append(f"  {part.name:<20}{part.target:<14}{part.nodes:>6}  {ops}{more}{note}")
        lines.extend(self._pruning_lines())
        lines.extend(self._quantization_lines())
        if self.precision is not None:
            lines.extend(f"  {line}" for line in str(self.precision).splitlines())
        if self.stages is not None:
            lines.extend(f"  {line}" for line in str(self.stages).splitlines())
        if self.stages_svg:
            lines.append("  the split as a picture: report.stages_svg (an SVG document)")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        if self.fallbacks:
            lines.append(f"  ops run in PyTorch ({len(self.fallbacks)}):")
            for f in self.fallbacks:
                lines.append(f"    {f.node}: {f.op} ({f.reason})")
        lines.append(
            f"  params {_human(self.params_before)} -> {_human(self.params_after)}, "
            f"weights {_human(self.weight_bytes_before)}B -> {_human(self.weight_bytes_after)}B, "
            f"FLOPs {_human(self.flops_before)} -> {_human(self.flops_after)}"
        )
        lines.append(
            f"  time: capture {self.capture_seconds:.2f}s, passes {self.passes_seconds:.2f}s, "
            f"lowering {self.lowering_seconds:.2f}s"
            + ("" if self.verified is None else f", verified against eager: {self.verified}")
        )
        return "\n".join(lines)

    def _pruning_lines(self) -> list[str]:
        p = self.pruning
        if p is None:
            return []
        before = sum(layer.params_before for layer in p.layers)
        after = sum(layer.params_after for layer in p.layers)
        flops_before = sum(layer.flops_before for layer in p.layers)
        flops_after = sum(layer.flops_after for layer in p.layers)
        kept = "nonzero weights" if p.method != "channels" else "weights"
        what = (
            f"{p.sparsity:.0%} of the channels of {p.groups_pruned} channel groups"
            if p.method == "channels"
            else f"{p.sparsity:.0%} of the weights, {p.method}"
        )
        lines = [
            f"  prune: {what}; conv/linear {kept} {_human(before)} -> {_human(after)} "
            f"({after / max(before, 1):.1%}), their FLOPs {_human(flops_before)} -> "
            f"{_human(flops_after)} ({flops_after / max(flops_before, 1):.1%})"
        ]
        lines.append(f"    {'layer':<40}{'weight shape':>26}{kept:>18}{'bytes':>18}{'FLOPs':>20}")
        for layer in p.layers:
            shape = "x".join(map(str, layer.shape_before))
            if layer.shape_after != layer.shape_before:
                shape += " -> " + "x".join(map(str, layer.shape_after))
            params = f"{_human(layer.params_before)} -> {_human(layer.params_after)}"
            nbytes = f"{_human(layer.bytes_before)} -> {_human(layer.bytes_after)}"
            flops = f"{_human(layer.flops_before)} -> {_human(layer.flops_after)}"
            name = layer.layer[:39]
            lines.append(f"    {name:<40}{shape:>26}{params:>18}{nbytes:>18}{flops:>20}")
        for reason, names in p.groups_fixed.items():
            shown = ", ".join(n.split(" (")[0] for n in names[:4])
            more = f" and {len(names) - 4} more" if len(names) > 4 else ""
            lines.append(f"    left whole ({reason}): {shown}{more}")
        if p.note:
            lines.append(f"    note: {p.note}")
        return lines

    def _quantization_lines(self) -> list[str]:
        q = self.quantization
        if q is None:
            if self.calibration_pending:
                return [
                    f"  int8: calibrating, {self.calibration_pending} more float calls before "
                    "the graph switches to int8"
                ]
            return []
        if not hasattr(q, "calibration_batches"):  # weight-only: a WeightOnlySummary
            return [f"  {line}" for line in str(q).splitlines()]
        done = sum(layer.quantized for layer in q.layers)
        budget = "" if q.accuracy_budget is None else f", budget {q.accuracy_budget:.2%}"
        lines = [
            f"  int8: {done}/{len(q.layers)} conv/linear layers quantized (observer {q.observer}, "
            f"{q.calibration_batches} calibration batches), output error {q.output_error:.2%} "
            f"vs float on them{budget}"
        ]
        for layer in q.layers:
            if not layer.quantized:
                why = (
                    ""
                    if layer.sensitivity is None
                    else f" (alone in int8: {layer.sensitivity:.2%})"
                )
                lines.append(f"    kept in float: {layer.layer}{why}")
        return lines


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _constants(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """The distinct constant tensors the graph reads (frozen weights, scales, ...)."""
    seen: set[str] = set()
    out = []
    for node in gm.graph.find_nodes(op="get_attr"):
        if node.target in seen or not node.users:
            continue
        seen.add(node.target)
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor):
            out.append(obj)
    return out


def count_params(gm: torch.fx.GraphModule) -> int:
    """Elements in the constants the graph uses (frozen weights)."""
    return sum(t.numel() for t in _constants(gm))


def count_weight_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of the constants the graph uses (int8 weights count one byte per element)."""
    return sum(t.numel() * t.element_size() for t in _constants(gm))


def count_flops(gm: torch.fx.GraphModule) -> int:
    """FLOPs of one call, from torch's flop formulas applied to node.meta["val"] shapes.

    Symbolic sizes count at the value seen while tracing.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return sum(node_flops(node) for node in gm.graph.nodes)


def node_flops(node: torch.fx.Node) -> int:
    """FLOPs of one node (torch's flop formula on its meta["val"] shapes; 0 without one)."""
    from torch.utils.flop_counter import flop_registry

    from graphopt.shapes import concrete

    if node.op != "call_function" or not hasattr(node.target, "overloadpacket"):
        return 0
    formula = flop_registry.get(node.target.overloadpacket)
    if formula is None:
        return 0

    def val(x: Any) -> Any:
        return x.meta.get("val") if isinstance(x, torch.fx.Node) else x

    args = torch.fx.node.map_aggregate(node.args, val)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, val)
    try:
        return int(concrete(formula(*args, out_val=node.meta.get("val"), **kwargs)))
    except Exception:  # noqa: BLE001 - a formula that rejects these args counts as 0
        return 0


def op_histogram(gm: torch.fx.GraphModule) -> dict[str, int]:
    return dict(Counter(op_name(n.target) for n in gm.graph.nodes if n.op == "call_function"))
