"""ATen graph -> Relax: `build_relax(gm, inputs, cfg)` applies one rule per node (`rules.TVM`).

Shapes come from `node.meta["val"]`; a symbolic dim (a SymInt over sympy symbols like s77)
becomes a `tvm.tirx.Var(name, "int64")` per symbol, bound by the input tensor that carries it.
Every rule's result is checked against the traced shape and dtype, so a rule bug is a
`LoweringError` (the partition runs in PyTorch) rather than wrong numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import tvm
from tvm import relax, tirx

from graphopt.backends import rule_context
from graphopt.backends.tvm.rules import TVM, TVM_DTYPES
from graphopt.backends.tvm.runtime import compact_strides
from graphopt.config import Config
from graphopt.ops import op_name
from graphopt.passes.base import get_attr_value

aten = torch.ops.aten
log = logging.getLogger(__name__)


class LoweringError(rule_context.LoweringError):
    """A graph the TVM backend cannot build; the caller runs that partition in PyTorch."""

    lowered_to = "TVM"


class LoweringContext(rule_context.RuleContext):
    """What a rule sees (`rule_context.RuleContext`): the relax value of each fx argument (a
    `tirx` expression for SymInt nodes, over one `tirx.Var` per symbol), and shapes from
    meta["val"]."""

    error = LoweringError
    dtypes = TVM_DTYPES
    size_ops = rule_context.SizeOps(
        integer=lambda v: tirx.IntImm("int64", v), floordiv=tirx.floordiv, mod=tirx.floormod
    )

    def __init__(self, bb: relax.BlockBuilder, cfg: Config):
        super().__init__(cfg)
        self.bb = bb

    def emit(self, expr: relax.Expr) -> relax.Var:
        return self.bb.emit(expr)

    def shape(self, node: Any) -> list[int | tirx.PrimExpr]:
        """The shape of a node's tensor value, symbolic dims as tirx expressions."""
        value = self.val(node) if isinstance(node, torch.fx.Node) else node
        return [self.dim(d) for d in value.shape]

    def const(self, value: Any, dtype: str) -> relax.Constant:
        """A scalar relax constant of `dtype`."""
        if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
            raise LoweringError(self._where(), f"symbolic scalar {value} used as a tensor value")
        return relax.const(value, dtype)


def build_relax(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config
) -> tvm.IRModule:
    """Translate `gm` into an IRModule whose "main" takes gm's tensor inputs, in order.

    Args:
        gm: a frozen core-ATen graph (weights are get_attr constants) with meta["val"] on nodes.
        example_inputs: the placeholders' values; only used for their count (shapes and dtypes
            come from meta["val"], so symbolic sizes stay symbolic).
        cfg: the graphopt Config (rules' checks may read it).
    Returns:
        An IRModule with one Relax function "main" returning a tuple of tensors.
    Raises:
        LoweringError: a node has no rule, its rule's check rejects it, or TVM rejects the IR.
    """
    placeholders = gm.graph.find_nodes(op="placeholder")
    if len(example_inputs) != len(placeholders):
        raise LoweringError(
            "<graph>", f"{len(placeholders)} placeholders but {len(example_inputs)} example inputs"
        )
    bb = relax.BlockBuilder()
    ctx = LoweringContext(bb, cfg)
    params = _make_params(gm, ctx)
    with bb.function("main", params):
        with bb.dataflow():
            outputs = []
            for node in gm.graph.nodes:
                ctx.node = node
                if node.op == "get_attr":
                    ctx.env[node] = _constant(gm, node)
                elif node.op == "call_function":
                    ctx.env[node] = _lower_call(ctx, node)
                elif node.op == "output":
                    outputs = _outputs(ctx, node)
                elif node.op != "placeholder":
                    raise LoweringError(node.name, f"{node.op} nodes are not lowered")
            result = bb.emit_output(relax.Tuple(outputs))
        bb.emit_func_output(result)
    return bb.get()


def _make_params(gm: torch.fx.GraphModule, ctx: LoweringContext) -> list[relax.Var]:
    """Relax params for tensor placeholders; SymInt placeholders map to their tirx expression."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    for node in placeholders:  # a symbol is bound by the first input dim that is exactly it
        value = ctx.val(node)
        for d in value.shape if isinstance(value, torch.Tensor) else ():
            if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                name = d.node.expr.name
                ctx.symbols.setdefault(name, tirx.Var(name, "int64"))
    params = []
    for node in placeholders:
        ctx.node = node
        value = ctx.val(node)
        if isinstance(value, torch.Tensor):
            var = relax.Var(node.name, relax.TensorType(ctx.shape(node), ctx.dtype(node)))
            params.append(var)
            ctx.env[node] = var
        elif isinstance(value, torch.SymInt):
            ctx.env[node] = ctx.dim(value)
        else:
            raise LoweringError(node.name, f"input of type {type(value).__name__} (not a tensor)")
    return params


def _constant(gm: torch.fx.GraphModule, node: torch.fx.Node) -> relax.Constant:
    """A get_attr tensor as a relax constant (a copy, so later changes to gm do not leak in)."""
    value = get_attr_value(gm, node)
    if not isinstance(value, torch.Tensor):
        raise LoweringError(node.name, f"get_attr of a {type(value).__name__}, not a tensor")
    if value.dtype not in TVM_DTYPES:
        raise LoweringError(node.name, f"constant of dtype {value.dtype} has no TVM equivalent")
    # A host copy whatever the tensor's device: TVM folds constants on the host and the VM
    # uploads them to the target's device when it loads (a CUDA tensor here would not fold).
    copy = value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
    return relax.const(tvm.runtime.from_dlpack(compact_strides(copy)))


def _lower_call(ctx: LoweringContext, node: torch.fx.Node) -> Any:
    reason = TVM.unsupported_reason(node, ctx.cfg)
    if reason is not None:
        raise LoweringError(node.name, reason)
    try:
        result = TVM.lookup(node.target).emit(ctx, node)
    except LoweringError:
        raise
    except (ValueError, TypeError, RuntimeError) as err:  # TVM's type inference rejected it
        raise LoweringError(node.name, f"{op_name(node.target)}: {err}") from err
    if result is not None or node.users:  # a dead getitem of an output not computed is fine
        _check_result(ctx, node, node.meta.get("val"), result)
    return result


def _check_result(ctx: LoweringContext, node: torch.fx.Node, expected: Any, got: Any) -> None:
    """A rule's result must have the dtype, rank and static sizes torch traced for the node."""
    if isinstance(expected, torch.Tensor):
        ty = got.ty if isinstance(got, relax.Expr) else None
        if not isinstance(ty, relax.TensorType):
            raise LoweringError(node.name, f"rule returned {type(got).__name__}, not a tensor")
        want_dtype = ctx.dtype(expected.dtype)
        if str(ty.dtype) != want_dtype or ty.ndim != expected.dim():
            raise LoweringError(
                node.name,
                f"rule gave {ty.dtype}[{ty.ndim}d], torch traced {want_dtype}[{expected.dim()}d]",
            )
        sizes = ty.shape.values if isinstance(ty.shape, relax.ShapeExpr) else ()
        for i, (size, want) in enumerate(zip(sizes, expected.shape)):
            if isinstance(size, tirx.IntImm) and not isinstance(want, torch.SymInt):
                if int(size) != int(want):
                    raise LoweringError(
                        node.name,
                        f"rule gave shape {list(sizes)}, torch traced "
                        f"{list(expected.shape)} (dim {i})",
                    )
    elif isinstance(expected, list | tuple) and isinstance(got, list | tuple):
        for want, value in zip(expected, got):
            if value is not None:
                _check_result(ctx, node, want, value)


def _outputs(ctx: LoweringContext, node: torch.fx.Node) -> list[relax.Expr]:
    args = node.args[0]
    args = list(args) if isinstance(args, list | tuple) else [args]
    outputs = []
    for arg in args:
        value = ctx.env.get(arg) if isinstance(arg, torch.fx.Node) else None
        if not isinstance(value, relax.Expr) or not isinstance(value.ty, relax.TensorType):
            raise LoweringError(node.name, f"output {arg} is not a tensor; TVM returns tensors")
        outputs.append(value)
    return outputs
