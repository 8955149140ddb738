"""Reductions: sum, mean, max/min (with indices), any/all, prod, var, vector norms,
cumsum/cumprod/logcumsumexp, softmax, logsumexp. Half types are accumulated in float32 and
rounded once, as torch's CPU kernels."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import torch
from jax import lax

from graphopt.backends.xla.rules.common import _axis, _cast, _is_float, rule
from graphopt.passes.base import named_args as args

aten = torch.ops.aten


def _axes(dim: Any, ndim: int) -> tuple[int, ...] | None:
    """A reduction's dims as non-negative axes; None (every axis) for no dims or []."""
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not dims:
        return None
    return tuple(_axis(d, max(ndim, 1)) for d in dims) if ndim else None


def _wide(x: Any) -> Any:
    """Half types as float32: torch's CPU reductions accumulate them in float32."""
    return x.astype(jnp.float32) if _is_float(x.dtype) and jnp.finfo(x.dtype).bits < 32 else x


def _reduce(op):
    """op(input, dims, keepdim) in the output dtype (sum of bool is int64, mean in the
    requested dtype; jnp's sum of int32 would be int64, torch's with dtype=int32 wraps),
    half types accumulated in float32 as torch's CPU kernels."""

    def lower(ctx, node):
        a = args(node)
        dtype = ctx.dtype(node)
        x = _cast(ctx[a["input"]], dtype)
        axis, keep = _axes(a.get("dim"), x.ndim), bool(a.get("keepdim", False))
        if _is_float(dtype):
            return op(_wide(x), axis=axis, keepdims=keep).astype(dtype)
        return op(x, axis=axis, keepdims=keep, dtype=dtype)

    return lower


rule(aten.sum.dim_IntList, aten.sum.default)(_reduce(jnp.sum))
rule(aten.mean.dim, aten.mean.default)(_reduce(jnp.mean))
rule(aten.prod.default, aten.prod.dim_int)(_reduce(jnp.prod))


@rule(aten.amax.default, aten.amin.default)
def amax_amin(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    op = jnp.max if node.target is aten.amax.default else jnp.min
    return op(x, axis=_axes(a["dim"], x.ndim), keepdims=bool(a["keepdim"]))


@rule(aten.any.dim, aten.any.dims, aten.any.default, aten.all.dim, aten.all.dims, aten.all.default)
def any_all(ctx, node):
    a = args(node)
    x = _cast(ctx[a["input"]], jnp.bool_)
    op = jnp.any if node.target._overloadpacket is aten.any else jnp.all
    out = op(x, axis=_axes(a.get("dim"), x.ndim), keepdims=bool(a.get("keepdim", False)))
    return _cast(out, ctx.dtype(node))  # all/any of uint8 is uint8


def _variance(x: Any, dim: Any, correction: Any, keepdim: bool) -> tuple[Any, Any]:
    """(var, mean): the sum of squared deviations over max(n - correction, 0), as torch's
    (a correction >= n gives inf, where jnp.var gives nan)."""
    axes = _axes(dim, x.ndim)
    wide = _wide(x)
    mean = jnp.mean(wide, axis=axes, keepdims=True)
    centered = wide - mean
    squares = jnp.sum(centered * centered, axis=axes, keepdims=keepdim)
    count = math.prod(x.shape[i] for i in (range(x.ndim) if axes is None else axes))
    correction = 1 if correction is None else correction
    divisor = jnp.maximum(jnp.asarray(count, wide.dtype) - correction, 0)
    if not keepdim:
        mean = mean.reshape(squares.shape)
    return (squares / divisor).astype(x.dtype), mean.astype(x.dtype)


@rule(aten.var.correction)
def var(ctx, node):
    a = args(node)
    return _variance(ctx[a["input"]], a["dim"], a["correction"], bool(a["keepdim"]))[0]


@rule(aten.var_mean.correction)
def var_mean(ctx, node):
    a = args(node)
    return _variance(ctx[a["input"]], a["dim"], a["correction"], bool(a["keepdim"]))


def _vector_norm_check(node, cfg):
    if isinstance(args(node)["ord"], torch.SymFloat | torch.SymInt):
        return "symbolic norm order"
    return None


@rule(aten.linalg_vector_norm.default, check=_vector_norm_check)
def vector_norm(ctx, node):
    """The ord-norm over dims, accumulated in float32 at least (as torch's CPU kernel):
    inf / -inf the largest / smallest |x|, 0 the count of nonzeros, else sum(|x|^ord)^(1/ord)."""
    a = args(node)
    dtype = ctx.dtype(node)
    x = _wide(_cast(ctx[a["input"]], dtype))
    axes, keep, order = _axes(a["dim"], x.ndim), bool(a["keepdim"]), float(a["ord"])
    magnitude = jnp.abs(x)
    if order == math.inf:
        out = jnp.max(magnitude, axis=axes, keepdims=keep)
    elif order == -math.inf:
        out = jnp.min(magnitude, axis=axes, keepdims=keep)
    elif order == 0:
        out = jnp.sum((x != 0).astype(x.dtype), axis=axes, keepdims=keep)
    elif order == 1:
        out = jnp.sum(magnitude, axis=axes, keepdims=keep)
    elif order == 2:
        out = jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=keep))
    else:
        powered = jnp.sum(magnitude ** jnp.asarray(order, x.dtype), axis=axes, keepdims=keep)
        out = powered ** jnp.asarray(1.0 / order, x.dtype)
    return out.astype(dtype)


def _arg_reduce(op):
    def lower(ctx, node):
        a = args(node)
        x = ctx[a["input"]]
        if a["dim"] is None:
            out = op(x.reshape(-1))
            return out.reshape((1,) * x.ndim) if a["keepdim"] else out.astype(jnp.int64)
        return op(
            x, axis=_axis(a["dim"], max(x.ndim, 1)) if x.ndim else None, keepdims=bool(a["keepdim"])
        )

    return lower


@rule(aten.max.default, aten.min.default)
def max_min(ctx, node):
    """The largest / smallest element (NaN if any is)."""
    x = ctx[node.args[0]]
    return jnp.max(x) if node.target is aten.max.default else jnp.min(x)


rule(aten.argmax.default)(_arg_reduce(jnp.argmax))
rule(aten.argmin.default)(_arg_reduce(jnp.argmin))


def _value_and_index(value_op, index_op):
    """max.dim / min.dim: (values, indices); ties go to the first index, as torch's."""

    def lower(ctx, node):
        a = args(node)
        x = ctx[a["input"]]
        axis = _axis(a["dim"], max(x.ndim, 1)) if x.ndim else None
        keep = bool(a["keepdim"])
        return (
            value_op(x, axis=axis, keepdims=keep),
            index_op(x, axis=axis, keepdims=keep).astype(jnp.int64),
        )

    return lower


rule(aten.max.dim)(_value_and_index(jnp.max, jnp.argmax))
rule(aten.min.dim)(_value_and_index(jnp.min, jnp.argmin))


def _scan_as_torch(x: Any, scan: Any) -> Any:
    """scan(x) with the running value torch's CPU kernels keep (`at::acc_type`): float64 for
    float32 on a CPU, float32 for half types, each output rounded once to x's dtype. A
    float32 scan elsewhere (a TPU has no float64): `lax.platform_dependent` picks per platform
    when the program runs, so one artifact serves both. The running precision matters where
    a scan feeds a difference: logcumsumexp's gradient is exp(a) - exp(b)."""
    if x.dtype == jnp.float32:

        def wide(v):
            return scan(v.astype(jnp.float64)).astype(v.dtype)

        return lax.platform_dependent(x, cpu=wide, default=scan)
    return scan(_wide(x)).astype(x.dtype)


@rule(aten.cumsum.default, aten.cumprod.default)
def cumulative(ctx, node):
    """In the output dtype, with the running value of torch's CPU kernel (`_scan_as_torch`;
    a running bfloat16 sum drifts from it by several ulps)."""
    a = args(node)
    dtype = ctx.dtype(node)
    x = _cast(ctx[a["input"]], dtype)
    if x.ndim == 0:
        return x
    op = jnp.cumsum if node.target is aten.cumsum.default else jnp.cumprod
    return _scan_as_torch(x, functools.partial(op, axis=_axis(a["dim"], x.ndim)))


def _running_extreme(later_wins):
    """cummax / cummin: (values, indices) of the running extreme, as torch's scan: a later
    element that ties takes over, a NaN takes over and stays (of NaNs, the later)."""

    def lower(ctx, node):
        a = args(node)
        x = ctx[a["input"]]
        if x.ndim == 0:
            return x, jnp.zeros((), jnp.int64)
        axis = _axis(a["dim"], x.ndim)

        def combine(earlier, later):
            (va, ia), (vb, ib) = earlier, later
            take = (vb != vb) | ((va == va) & later_wins(vb, va))
            return jnp.where(take, vb, va), jnp.where(take, ib, ia)

        index = lax.broadcasted_iota(jnp.int64, x.shape, axis)
        return lax.associative_scan(combine, (x, index), axis=axis)

    return lower


rule(aten.cummax.default)(_running_extreme(jnp.greater_equal))
rule(aten.cummin.default)(_running_extreme(jnp.less_equal))


@rule(aten.logcumsumexp.default)
def logcumsumexp(ctx, node):
    """log(cumsum(exp(x))) without overflow, with torch's running precision (`_scan_as_torch`)."""
    a = args(node)
    x = ctx[a["input"]]
    if x.ndim == 0:
        return x
    return _scan_as_torch(x, functools.partial(lax.cumlogsumexp, axis=_axis(a["dim"], x.ndim)))


def _softmax_check(node, cfg):
    if args(node)["half_to_float"]:
        return "softmax with half_to_float"
    return None


@rule(aten._softmax.default, aten._log_softmax.default, check=_softmax_check)
def softmax(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    if x.ndim == 0:  # softmax of a scalar is 1, its log 0
        one = jnp.ones_like(x)
        return one if node.target is aten._softmax.default else one - one
    op = jax.nn.softmax if node.target is aten._softmax.default else jax.nn.log_softmax
    return op(_wide(x), axis=_axis(a["dim"], x.ndim)).astype(x.dtype)  # half: as torch's


@rule(aten.logsumexp.default)
def logsumexp(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    dtype = ctx.dtype(node)
    out = jax.nn.logsumexp(
        _wide(_cast(x, dtype)), axis=_axes(a["dim"], x.ndim), keepdims=bool(a["keepdim"])
    )
    return out.astype(dtype)
