"""cast_precision: run the matmuls and convolutions in bfloat16 or float16 (`Config.dtype`).

The policy is torch.autocast's, applied to the captured ATen graph once instead of at every
call, with softmax, normalizations and reductions kept in float32 as the issue of half
precision asks:

  * LOW ops (matmuls, convolutions: where the FLOPs and the weight bytes are) take their
    float32 inputs in the low-precision dtype. Constant weights are converted here, once, so
    the compiled graph holds them at 2 bytes a weight; activations get a cast node, which
    inductor fuses into the producer.
  * FOLLOW ops (elementwise arithmetic and activations, views, concatenation, pooling) run in
    whatever dtype reaches them, with ATen's type promotion: bf16 + fp32 is fp32, so a
    residual stream that starts in float32 (a transformer's embeddings) stays float32.
  * every other op (softmax, layer/RMS/group norm, sums and means, exp/log/pow/rsqrt, in-place
    writes such as a KV-cache update, anything unknown) gets its inputs back in the dtypes it
    was traced with: it computes exactly as before, and the report names it as kept float32.

Graph outputs are cast back to their traced dtypes, so callers see the same dtypes as eager.
On a CPU without native arithmetic for the dtype (bfloat16: AVX512_BF16 or AMX; float16:
AVX512_FP16 or AMX-FP16, as oneDNN reports) nothing is cast: emulated half precision is
slower than float32. The report says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_arg

from graphopt.config import Config
from graphopt.ops import VIEWS
from graphopt.passes.base import (
    PassResult,
    add_constant,
    fake_like,
    fake_mode_of,
    fake_value,
    get_attr_value,
)

aten = torch.ops.aten
log = logging.getLogger("graphopt")

# Config.dtype names -> torch dtypes ("float32" is not here: nothing to do)
_LOW_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

# Where the FLOPs are: every floating input of these is cast to the low-precision dtype.
LOW = frozenset(
    {
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten.baddbmm.default,
        aten.convolution.default,
    }
)

# Elementwise ops that lose accuracy in 8 bits of mantissa, or feed a normalizer: float32.
_PRECISE = frozenset(
    {
        aten.exp.default,
        aten.exp2.default,
        aten.expm1.default,
        aten.log.default,
        aten.log1p.default,
        aten.log2.default,
        aten.pow.Tensor_Scalar,
        aten.pow.Tensor_Tensor,
        aten.pow.Scalar,
        aten.rsqrt.default,
        aten.sqrt.default,
        aten.reciprocal.default,
    }
)

# Not pointwise-tagged, but move or gather values without arithmetic (or pool them, which
# CPU kernels accumulate in float32): they run in the dtype that reaches them.
_DATA_MOVEMENT = VIEWS | {
    aten.reshape.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.unbind.int,
    aten.cat.default,
    aten.stack.default,
    aten.constant_pad_nd.default,
    aten.index.Tensor,
    aten.index_select.default,
    aten.max_pool2d_with_indices.default,
    aten.avg_pool2d.default,
    aten._adaptive_avg_pool2d.default,
}


def follows(target: Any) -> bool:
    """Whether an op runs in the dtype its inputs arrive in (see the module docstring)."""
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return False
    if target in _PRECISE:
        return False
    return target in _DATA_MOVEMENT or torch.Tag.pointwise in target.tags


def native(dtype: torch.dtype) -> bool:
    """Whether this CPU computes `dtype` in hardware (oneDNN's own check)."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


@dataclass
class PrecisionSummary:
    """What `cast_precision` did, for the report."""

    dtype: str
    applied: bool
    low_ops: dict[str, int] = field(default_factory=dict)  # op -> count run in `dtype`
    kept_float32: dict[str, int] = field(default_factory=dict)  # op -> count cast back up
    weight_bytes_before: int = 0  # of the constants converted
    weight_bytes_after: int = 0
    note: str = ""

    def __str__(self) -> str:
        if not self.applied:
            return f"{self.dtype}: not applied ({self.note})"

        def ops(counts: dict[str, int]) -> str:
            shown = sorted(counts.items(), key=lambda kv: -kv[1])
            return ", ".join(f"{k} x{v}" for k, v in shown) or "none"

        return (
            f"{self.dtype}: {sum(self.low_ops.values())} matmuls/convolutions in {self.dtype} "
            f"({ops(self.low_ops)}), their weights {self.weight_bytes_before / 1e6:.1f} MB -> "
            f"{self.weight_bytes_after / 1e6:.1f} MB\n"
            f"  stayed float32 (softmax, norms, reductions, ...): {ops(self.kept_float32)}"
        )


def cast_precision(gm: torch.fx.GraphModule, cfg: Config) -> PassResult:
    """Compute the graph's matmuls and convolutions in `cfg.dtype` (see the module docstring).

    Before -> after (dtype="bfloat16"):
        y = addmm(b, x, w_t); z = relu(y); s = _softmax(z, -1)
        -> y = addmm(b16, _to_copy(x, bf16), w16_t); z = relu(y)      # bf16
           s = _softmax(_to_copy(z, float32), -1)                     # float32 as traced

    Args:
        gm: a frozen graph after constant folding; changed in place.
        cfg: `cfg.dtype` names the precision ("float32" does nothing).

    Returns:
        PassResult with stats {"low_precision_ops", "casts", "kept_float32"}; the summary
        (a PrecisionSummary) in gm.meta["graphopt.precision"].
    """
    dtype = _LOW_DTYPES.get(cfg.dtype)
    if dtype is None:
        return PassResult(gm, False)
    summary = PrecisionSummary(cfg.dtype, applied=False)
    gm.meta["graphopt.precision"] = summary
    if not native(dtype):
        summary.note = (
            f"this CPU has no native {cfg.dtype} arithmetic (oneDNN reports none), where it "
            "would be emulated and slower than float32: the graph stays float32"
        )
        log.warning("graphopt: dtype=%r %s", cfg.dtype, summary.note)
        return PassResult(gm, False)
    mode = fake_mode_of(gm)
    if mode is None:
        summary.note = "the graph carries no traced metadata to cast by"
        return PassResult(gm, False)
    rewriter = _Rewriter(gm, dtype, mode, summary)
    rewriter.run()
    summary.applied = True
    gm.graph.lint()
    stats = {
        "low_precision_ops": sum(summary.low_ops.values()),
        "casts": rewriter.casts,
        "kept_float32": sum(summary.kept_float32.values()),
    }
    return PassResult(gm, bool(summary.low_ops), stats)


def _dtype_of(node: Any) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _op_name(target: Any) -> str:
    return getattr(target, "__name__", str(target)).split(".")[0]


class _Rewriter:
    def __init__(self, gm: torch.fx.GraphModule, dtype: torch.dtype, mode: Any, summary: Any):
        self.gm, self.dtype, self.mode, self.summary = gm, dtype, mode, summary
        # Each node's dtype as traced: what the ops that do not follow get back.
        self.traced = {n: _dtype_of(n) for n in gm.graph.nodes}
        self.cast_cache: dict[tuple[torch.fx.Node, torch.dtype], torch.fx.Node] = {}
        self.constant_cache: dict[str, torch.fx.Node] = {}
        self.retyped: set[torch.fx.Node] = set()  # nodes whose value changed dtype (or is new)
        self.casts = 0

    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node.op == "call_function":
                self._visit(node)
            elif node.op == "output":
                self._restore(node)  # callers get the dtypes eager returns

    def _visit(self, node: torch.fx.Node) -> None:
        if node.target in LOW:
            self._lower(node)
        elif not follows(node.target):
            if self._restore(node):
                name = _op_name(node.target)
                self.summary.kept_float32[name] = self.summary.kept_float32.get(name, 0) + 1
        if any(a in self.retyped for a in node.all_input_nodes):
            try:
                node.meta["val"] = fake_value(node, self.mode)
            except Exception:  # noqa: BLE001 - an op that takes no mixed dtypes: as traced
                if not self._restore(node):
                    raise
                node.meta["val"] = fake_value(node, self.mode)
            self.retyped.add(node)

    def _lower(self, node: torch.fx.Node) -> None:
        changed = False

        def cast(arg: torch.fx.Node) -> torch.fx.Node:
            nonlocal changed
            if _dtype_of(arg) != torch.float32:
                return arg
            changed = True
            if arg.op == "get_attr":
                return self._low_constant(arg)
            return self._cast(arg, self.dtype, node)

        node.args = map_arg(node.args, cast)
        node.kwargs = map_arg(node.kwargs, cast)
        if changed:
            name = _op_name(node.target)
            self.summary.low_ops[name] = self.summary.low_ops.get(name, 0) + 1

    def _restore(self, node: torch.fx.Node) -> bool:
        """Cast every input of `node` whose dtype changed back to its traced dtype."""
        changed = False

        def back(arg: torch.fx.Node) -> torch.fx.Node:
            nonlocal changed
            want = self.traced.get(arg)
            if want is None or _dtype_of(arg) in (None, want):
                return arg
            changed = True
            return self._cast(arg, want, node)

        node.args = map_arg(node.args, back)
        node.kwargs = map_arg(node.kwargs, back)
        return changed

    def _cast(self, arg: torch.fx.Node, dtype: torch.dtype, before: torch.fx.Node) -> torch.fx.Node:
        key = (arg, dtype)
        if key not in self.cast_cache:
            # Before the first reader: nodes are visited in order, so every later one shares it.
            with self.gm.graph.inserting_before(before):
                cast = self.gm.graph.call_function(aten._to_copy.default, (arg,), {"dtype": dtype})
            cast.meta["val"] = fake_value(cast, self.mode)
            self.traced[cast] = dtype
            self.retyped.add(cast)
            self.cast_cache[key] = cast
            self.casts += 1
        return self.cast_cache[key]

    def _low_constant(self, arg: torch.fx.Node) -> torch.fx.Node:
        """A get_attr node for the constant `arg` reads, converted to the low dtype once."""
        if arg.target not in self.constant_cache:
            value = get_attr_value(self.gm, arg)
            low = value.to(self.dtype)
            hint = f"{arg.target.removeprefix('_graphopt_')}_{str(self.dtype).split('.')[-1]}"
            name = add_constant(self.gm, low, hint)
            with self.gm.graph.inserting_before(arg):
                node = self.gm.graph.get_attr(name)
            node.meta["val"] = fake_like(self.gm, low)
            self.traced[node] = self.dtype
            self.retyped.add(node)
            self.constant_cache[arg.target] = node
            self.summary.weight_bytes_before += value.numel() * value.element_size()
            self.summary.weight_bytes_after += low.numel() * low.element_size()
        return self.constant_cache[arg.target]
