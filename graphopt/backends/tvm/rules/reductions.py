"""Reduction rules: sum/mean/amax/..., var, arg-reductions, cumsum, softmax."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx
from tvm import relax

from graphopt.backends.tvm.rules.common import (
    _axis,
    _cast,
    _dtype_of,
    _is_float,
    _not_equal,
    rule,
)
from graphopt.passes.base import named_args as args

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
R = relax.op


def _axes(dim: Any, ndim: int) -> list[int] | None:
    """Reduced axes; None (all) for dim=None or dim=[] (torch reduces everything then)."""
    if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
        return None
    dims = dim if isinstance(dim, list | tuple) else [dim]
    return sorted(_axis(d, ndim) for d in dims)


def _any_int8(ctx, mask: relax.Expr, axes: list[int] | None, keepdim: bool) -> relax.Expr:
    """Whether any element of a bool mask is set over axes, as int8 0 or 1."""
    return ctx.emit(R.max(R.astype(mask, "int8"), axes, keepdim))


def _extreme(ctx, op, x: relax.Expr, axes: list[int] | None, keepdim: bool) -> relax.Expr:
    """max (op R.max) or min (R.min) of x over axes, as torch's: a NaN anywhere gives NaN, and
    a max over nothing but -inf (a fully masked row) is -inf. TVM's reductions skip NaN and
    start from the dtype's lowest (highest) finite value, so both are put right here."""
    out = ctx.emit(op(x, axes, keepdim))
    dtype = _dtype_of(x)
    if not _is_float(dtype):
        return out
    inf = ctx.const(-math.inf if op is R.max else math.inf, dtype)
    zero = ctx.const(0, "int8")
    only_inf = R.equal(_any_int8(ctx, _not_equal(x, inf), axes, keepdim), zero)
    out = ctx.emit(R.where(only_inf, inf, out))
    any_nan = R.not_equal(_any_int8(ctx, R.isnan(x), axes, keepdim), zero)
    return ctx.emit(R.where(any_nan, ctx.const(math.nan, dtype), out))


def _arg_extreme(ctx, op, x: relax.Expr, axis: int | None, keepdim: bool) -> relax.Expr:
    """argmax/argmin of x along axis, as torch's: the first NaN where there is one, and the
    first element where all are the infinity TVM's start value stands in for (TVM gives -1
    there: its running index starts at -1 and no element beats its start value)."""
    index = ctx.emit(op(x, axis, keepdim))
    if not _is_float(_dtype_of(x)):
        return index
    index = ctx.emit(R.where(R.less(index, ctx.const(0, "int64")), ctx.const(0, "int64"), index))
    nan = ctx.emit(R.isnan(x))
    first_nan = ctx.emit(R.argmax(R.astype(nan, "int8"), axis, keepdim))
    axes = [axis] if axis is not None else None
    any_nan = R.not_equal(_any_int8(ctx, nan, axes, keepdim), ctx.const(0, "int8"))
    return ctx.emit(R.where(any_nan, first_nan, index))


def _reduce(op, *, via_int8_for_bool: bool = False):
    """op(x, axes, keepdims), x cast to the output dtype first (sum of int32 is int64)."""

    def lower(ctx, node):
        a = args(node)
        x = ctx[a["input"]]
        ndim = ctx.val(a["input"]).dim()
        axes = _axes(a.get("dim"), ndim)
        keepdim = a.get("keepdim", False)
        dtype = ctx.dtype(node)
        if ndim == 0:  # a reduction of a 0-d tensor is the value itself (TVM rejects it)
            return _cast(ctx, x, dtype)
        if via_int8_for_bool and dtype == "bool":  # TVM's max/min take no bool
            out = ctx.emit(op(_cast(ctx, x, "int8"), axes, keepdim))
            return _cast(ctx, out, "bool")
        if op in (R.max, R.min):
            return _extreme(ctx, op, _cast(ctx, x, dtype), axes, keepdim)
        return ctx.emit(op(_cast(ctx, x, dtype), axes, keepdim))

    return lower


rule(aten.sum.dim_IntList, aten.sum.default)(_reduce(R.sum))
rule(aten.mean.dim, aten.mean.default)(_reduce(R.mean))


def _not_0d(node, cfg):
    """TVM's max/min/argmax/take reject 0-d tensors ("Cannot reduce a 0 dim Tensor")."""
    return "0-d input" if node.args[0].meta["val"].dim() == 0 else None


rule(aten.amax.default)(_reduce(R.max, via_int8_for_bool=True))
rule(aten.amin.default)(_reduce(R.min, via_int8_for_bool=True))


@rule(aten.any.dim, aten.any.dims, aten.any.default)
def any_(ctx, node):
    """any(x) = max(x != 0) over the axes, computed in int8."""
    a = args(node)
    x = _cast(ctx, _cast(ctx, ctx[a["input"]], "bool"), "int8")
    axes = _axes(a.get("dim"), ctx.val(a["input"]).dim())
    return _cast(ctx, ctx.emit(R.max(x, axes, a.get("keepdim", False))), "bool")


def _static_reduced_dims(node, cfg):
    a = args(node)
    shape = a["input"].meta["val"].shape
    axes = _axes(a["dim"], len(shape)) or range(len(shape))
    if any(isinstance(shape[i], torch.SymInt) for i in axes):
        return "variance over a symbolic dim"
    return None


@rule(aten.var.correction, check=_static_reduced_dims)
def var(ctx, node):
    """TVM's variance is the population variance: scale by n / (n - correction)."""
    a = args(node)
    shape = ctx.shape(a["input"])
    axes = _axes(a["dim"], len(shape))
    n = math.prod(shape[i] for i in (axes if axes is not None else range(len(shape))))
    correction = 1 if a["correction"] is None else a["correction"]
    out = ctx.emit(R.variance(ctx[a["input"]], axes, a["keepdim"]))
    if correction == 0:
        return out
    scale = n / (n - correction) if n > correction else math.inf
    return ctx.emit(R.multiply(out, ctx.const(scale, _dtype_of(out))))


def _arg_reduce(op):
    def lower(ctx, node):
        a = args(node)
        dim = a["dim"]
        axis = None if dim is None else _axis(dim, ctx.val(a["input"]).dim())
        return _arg_extreme(ctx, op, ctx[a["input"]], axis, a["keepdim"])

    return lower


def _no_bool_input(node, cfg):
    """TVM's argmax/argmin/max/min take no bool or 0-d tensors."""
    return "bool input" if node.args[0].meta["val"].dtype == torch.bool else _not_0d(node, cfg)


rule(aten.argmax.default, check=_no_bool_input)(_arg_reduce(R.argmax))
rule(aten.argmin.default, check=_no_bool_input)(_arg_reduce(R.argmin))


def _value_and_index(value_op, index_op):
    """max.dim / min.dim: (values, indices) along one dim."""

    def lower(ctx, node):
        a = args(node)
        x = ctx[a["input"]]
        axis = _axis(a["dim"], ctx.val(a["input"]).dim())
        return (
            _extreme(ctx, value_op, x, [axis], a["keepdim"]),
            _arg_extreme(ctx, index_op, x, axis, a["keepdim"]),
        )

    return lower


rule(aten.max.dim, check=_no_bool_input)(_value_and_index(R.max, R.argmax))
rule(aten.min.dim, check=_no_bool_input)(_value_and_index(R.min, R.argmin))


@rule(aten.cumsum.default)
def cumsum(ctx, node):
    a = args(node)
    axis = _axis(a["dim"], ctx.val(a["input"]).dim())
    return ctx.emit(R.cumsum(ctx[a["input"]], axis, dtype=ctx.dtype(node)))


def _same_dtype_softmax(node, cfg):
    return "half_to_float softmax (CUDA-only fp16 -> fp32)" if node.args[2] else None


@rule(aten._softmax.default, aten._log_softmax.default, check=_same_dtype_softmax)
def softmax(ctx, node):
    a = args(node)
    op = R.nn.softmax if node.target is aten._softmax.default else R.nn.log_softmax
    return ctx.emit(op(ctx[a["input"]], _axis(a["dim"], ctx.val(a["input"]).dim())))
