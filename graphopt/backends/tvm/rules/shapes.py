"""Shape, copy and constructor rules: views, permutes, cat/slice/select/split, getitem,
sym_size, _to_copy, full/arange."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx
from tvm import relax

from graphopt.backends.registry import (
    integer_size,
    same_device_strided,
    static_arange,
    static_scalars,
)
from graphopt.backends.tvm.rules.common import (
    TVM,
    _axis,
    _cast,
    _operand,
    rule,
)
from graphopt.passes.base import named_args as args

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
R = relax.op


def _reshape_to_output(ctx, node):
    """view / reshape / squeeze / unsqueeze / flatten: the traced output shape says it all."""
    return ctx.emit(R.reshape(ctx[node.args[0]], ctx.shape(node)))


rule(
    aten.view.default,
    aten._unsafe_view.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
)(_reshape_to_output)


@rule(aten.clone.default, aten.alias.default)
def identity(ctx, node):
    """Values are immutable in Relax: a copy is the value itself."""
    return ctx[node.args[0]]


@TVM.rule(aten._assert_tensor_metadata.default)  # returns nothing, so it has no meta["val"]
def assert_tensor_metadata(ctx, node):
    """Checked when torch traced the graph; nothing to compute."""
    return None


@rule(aten.permute.default)
def permute(ctx, node):
    a = args(node)
    ndim = len(a["dims"])
    return ctx.emit(R.permute_dims(ctx[a["input"]], [_axis(d, ndim) for d in a["dims"]]))


@rule(aten.t.default)
def t(ctx, node):
    x = ctx[node.args[0]]
    return ctx.emit(R.permute_dims(x, [1, 0])) if len(ctx.shape(node)) == 2 else x


@rule(aten.transpose.int)
def transpose(ctx, node):
    a = args(node)
    ndim = len(ctx.shape(node))
    axes = list(range(ndim))
    i, j = _axis(a["dim0"], ndim), _axis(a["dim1"], ndim)
    axes[i], axes[j] = axes[j], axes[i]
    return ctx.emit(R.permute_dims(ctx[a["input"]], axes))


@rule(aten.expand.default)
def expand(ctx, node):
    return ctx.emit(R.broadcast_to(ctx[node.args[0]], ctx.shape(node)))


@rule(aten.flip.default)
def flip(ctx, node):
    a = args(node)
    x, ndim = ctx[a["input"]], len(ctx.shape(node))
    for dim in a["dims"]:
        x = ctx.emit(R.flip(x, _axis(dim, ndim)))
    return x


@rule(aten.repeat.default)
def repeat(ctx, node):
    a = args(node)
    return ctx.emit(R.tile(ctx[a["input"]], list(a["repeats"])))


def _cat_check(node, cfg):
    out_ndim = node.meta["val"].dim()
    for t in args(node)["tensors"]:
        if t.meta["val"].dim() != out_ndim:  # torch.cat skips 1-d empty tensors
            return "cat of tensors of different ranks (legacy empty-tensor skipping)"
    return None


@rule(aten.cat.default, check=_cat_check)
def cat(ctx, node):
    a = args(node)
    dtype = ctx.dtype(node)
    tensors = [_operand(ctx, t, dtype) for t in a["tensors"]]
    return ctx.emit(R.concat(tensors, axis=_axis(a["dim"], len(ctx.shape(node)))))


def _slice(ctx, x: relax.Expr, axis: int, begin: Any, length: Any, step: int) -> relax.Expr:
    """`length` elements of `x` along `axis` from `begin` with `step`."""
    end = begin + (length - 1) * step + 1
    return ctx.emit(R.strided_slice(x, axes=[axis], begin=[begin], end=[end], strides=[step]))


def _static_slice_args(node, cfg):
    a = args(node)
    for key in ("start", "step", "index"):
        if isinstance(a.get(key), torch.SymInt | torch.fx.Node):
            return f"symbolic slice {key}"
    return None


@rule(aten.slice.Tensor, check=_static_slice_args)
def slice_(ctx, node):
    """begin from `start` (normalized), length from the traced output: no clamping to redo."""
    a = args(node)
    ndim = len(ctx.shape(node))
    axis = _axis(a["dim"], ndim)
    size = ctx.shape(a["input"])[axis]
    length = ctx.shape(node)[axis]
    if isinstance(length, int) and length == 0:
        return ctx.emit(R.strided_slice(ctx[a["input"]], [axis], [0], [0]))
    start = a["start"] or 0
    if start < 0:
        start = size + start
    if isinstance(size, int):
        start = min(max(start, 0), size)
    return _slice(ctx, ctx[a["input"]], axis, start, length, a["step"])


@rule(aten.select.int, check=_static_slice_args)
def select(ctx, node):
    a = args(node)
    ndim = ctx.val(a["input"]).dim()
    axis = _axis(a["dim"], ndim)
    index = a["index"]
    if index < 0:
        index = ctx.shape(a["input"])[axis] + index
    part = _slice(ctx, ctx[a["input"]], axis, index, 1, 1)
    return ctx.emit(R.reshape(part, ctx.shape(node)))


@rule(aten.split.Tensor, aten.split_with_sizes.default)
def split(ctx, node):
    """One strided slice per piece, sizes from the traced outputs."""
    a = args(node)
    x = ctx[a["input"]]
    axis = _axis(a["dim"], ctx.val(a["input"]).dim())
    pieces, begin = [], 0
    for piece in ctx.val(node):
        length = ctx.dim(piece.shape[axis])
        pieces.append(_slice(ctx, x, axis, begin, length, 1))
        begin = begin + length
    return tuple(pieces)


@rule(operator.getitem, check=lambda node, cfg: TVM.unsupported_reason(node.args[0], cfg))
def getitem(ctx, node):
    """Output i of a multi-output op (a Python tuple of relax values, or a relax tuple)."""
    source, index = ctx[node.args[0]], node.args[1]
    if isinstance(source, list | tuple):
        if source[index] is None and node.users:
            raise ValueError(f"output {index} of {node.args[0].name} is not lowered")
        return source[index]
    return ctx.emit(relax.TupleGetItem(source, index))


@rule(
    aten.sym_size.int,
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.mod,
    check=integer_size,
)
def sym_size(ctx, node):
    """Sizes and size arithmetic (s0 * 4) as tirx expressions, read from the traced value."""
    return ctx.dim(ctx.val(node))


@rule(aten._to_copy.default, check=same_device_strided)
def to_copy(ctx, node):
    return _cast(ctx, ctx[node.args[0]], ctx.dtype(node))


@rule(aten.full.default, aten.full_like.default, check=static_scalars)
def full(ctx, node):
    dtype = ctx.dtype(node)
    return ctx.emit(R.full(ctx.shape(node), ctx.const(args(node)["fill_value"], dtype), dtype))


@rule(aten.scalar_tensor.default, check=static_scalars)
def scalar_tensor(ctx, node):
    return ctx.const(args(node)["s"], ctx.dtype(node))


@rule(aten.arange.default, aten.arange.start, aten.arange.start_step, check=static_arange)
def arange(ctx, node):
    """start, step static; end may be a size expression (arange(2 * batch))."""
    a = args(node)
    start, step = a.get("start", 0), a.get("step", 1)
    return ctx.emit(R.arange(start, ctx[a["end"]], step, dtype=ctx.dtype(node)))
