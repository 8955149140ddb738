"""Reductions: sum, mean, max/min (with indices), any/all, prod, var, cumsum/cumprod, softmax,
logsumexp."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import torch

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


def _reduce(op):
    """op(input, dims, keepdim), the input cast to the output dtype first (sum of bool is
    int64, mean in the requested dtype)."""

    def lower(ctx, node):
        a = args(node)
        x = _cast(ctx[a["input"]], ctx.dtype(node))
        return op(x, axis=_axes(a.get("dim"), x.ndim), keepdims=bool(a.get("keepdim", False)))

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


@rule(aten.var.correction)
def var(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    correction = 1 if a["correction"] is None else a["correction"]
    return jnp.var(x, axis=_axes(a["dim"], x.ndim), ddof=correction, keepdims=bool(a["keepdim"]))


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


@rule(aten.cumsum.default, aten.cumprod.default)
def cumulative(ctx, node):
    a = args(node)
    x = _cast(ctx[a["input"]], ctx.dtype(node))
    if x.ndim == 0:
        return x
    op = jnp.cumsum if node.target is aten.cumsum.default else jnp.cumprod
    return op(x, axis=_axis(a["dim"], x.ndim))


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
    return op(x, axis=_axis(a["dim"], x.ndim))


@rule(aten.logsumexp.default)
def logsumexp(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    if not _is_float(x.dtype):
        x = x.astype(ctx.dtype(node))
    return jax.nn.logsumexp(x, axis=_axes(a["dim"], x.ndim), keepdims=bool(a["keepdim"]))
