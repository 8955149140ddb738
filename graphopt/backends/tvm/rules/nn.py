"""Linear algebra, convolution, normalization, pooling, padding, embedding and gather rules."""

from __future__ import annotations

from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx
from tvm import relax

from graphopt.backends.registry import static_scalars
from graphopt.backends.tvm.rules.common import (
    _axis,
    _dtype_of,
    _first_output_only,
    rule,
)
from graphopt.backends.tvm.rules.quantized import _int8_matmul, _int8_operands
from graphopt.backends.tvm.rules.reductions import _not_0d
from graphopt.passes.base import named_args as args

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
R = relax.op


@rule(aten.mm.default, aten.bmm.default)
def matmul(ctx, node):
    """mm of a dequantized activation by a dequantized weight runs in integers (see int8)."""
    if node.target is aten.mm.default:
        product = _int8_matmul(ctx, node.args[0], node.args[1])
        if product is not None:
            return product
    return ctx.emit(R.matmul(ctx[node.args[0]], ctx[node.args[1]]))


@rule(aten.addmm.default, check=static_scalars)
def addmm(ctx, node):
    """beta * input + alpha * (mat1 @ mat2); an int8 mat1 @ mat2 runs in integers."""
    a = args(node)
    product = _int8_matmul(ctx, a["mat1"], a["mat2"])
    if product is None:
        product = ctx.emit(R.matmul(ctx[a["mat1"]], ctx[a["mat2"]]))
    dtype = _dtype_of(product)
    if a["alpha"] != 1:
        product = ctx.emit(R.multiply(product, ctx.const(a["alpha"], dtype)))
    if a["beta"] == 0:
        return product
    bias = ctx[a["input"]]
    if a["beta"] != 1:
        bias = ctx.emit(R.multiply(bias, ctx.const(a["beta"], dtype)))
    return ctx.emit(R.add(product, bias))


def _conv_check(node, cfg):
    a = args(node)
    if a["transposed"]:
        return "transposed convolution is not lowered to TVM"
    if a["weight"].meta["val"].dim() not in (3, 4):
        return f"{a['weight'].meta['val'].dim() - 2}-d convolution (TVM rule: 1-d and 2-d)"
    if a["input"].meta["val"].dim() != a["weight"].meta["val"].dim():
        return "unbatched convolution input"
    return None


@rule(aten.convolution.default, check=_conv_check)
def convolution(ctx, node):
    """A dequantized activation convolved with a dequantized weight runs in integers (int8)."""
    a = args(node)
    conv = R.nn.conv2d if len(ctx.shape(a["weight"])) == 4 else R.nn.conv1d
    attrs = {
        "strides": a["stride"],
        "padding": a["padding"],
        "dilation": a["dilation"],
        "groups": a["groups"],
    }
    operands = _int8_operands(ctx, a["input"], a["weight"], 0)
    if operands is not None:
        x, weight, scale = operands
        acc = ctx.emit(conv(x, weight, **attrs, out_dtype="int32"))
        scale = ctx.emit(R.reshape(scale, [1, -1] + [1] * (len(ctx.shape(node)) - 2)))
        out = ctx.emit(R.multiply(R.astype(acc, "float32"), scale))
    else:
        out = ctx.emit(conv(ctx[a["input"]], ctx[a["weight"]], **attrs))
    if a["bias"] is None:
        return out
    ndim = len(ctx.shape(node))
    bias = ctx.emit(R.reshape(ctx[a["bias"]], [1, -1] + [1] * (ndim - 2)))
    return ctx.emit(R.add(out, bias))


def _ones_or(ctx, arg: Any, shape: list, dtype: str, fill: float) -> relax.Expr:
    """An optional affine parameter, or a constant filled with `fill` when it is None."""
    return ctx[arg] if arg is not None else R.full(shape, relax.const(fill, dtype), dtype)


@rule(aten.native_layer_norm.default, check=_first_output_only)
def layer_norm(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    dtype, ndim = _dtype_of(x), len(ctx.shape(a["input"]))
    shape = list(a["normalized_shape"])
    axes = list(range(ndim - len(shape), ndim))
    gamma = _ones_or(ctx, a["weight"], shape, dtype, 1.0)
    beta = _ones_or(ctx, a["bias"], shape, dtype, 0.0)
    return (ctx.emit(R.nn.layer_norm(x, gamma, beta, axes, epsilon=a["eps"])), None, None)


@rule(aten.native_group_norm.default, check=_first_output_only)
def group_norm(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    dtype, ndim = _dtype_of(x), len(ctx.shape(a["input"]))
    channels = [ctx.dim(a["C"])]
    gamma = _ones_or(ctx, a["weight"], channels, dtype, 1.0)
    beta = _ones_or(ctx, a["bias"], channels, dtype, 0.0)
    out = R.nn.group_norm(x, gamma, beta, a["group"], 1, list(range(2, ndim)), a["eps"])
    return (ctx.emit(out), None, None)


@rule(aten._native_batch_norm_legit_no_training.default, check=_first_output_only)
def batch_norm(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    dtype = _dtype_of(x)
    channels = [ctx.shape(a["input"])[1]]
    gamma = _ones_or(ctx, a["weight"], channels, dtype, 1.0)
    beta = _ones_or(ctx, a["bias"], channels, dtype, 0.0)
    mean, var_ = ctx[a["running_mean"]], ctx[a["running_var"]]
    bn = ctx.emit(R.nn.batch_norm(x, gamma, beta, mean, var_, 1, a["eps"], training=False))
    return (ctx.emit(relax.TupleGetItem(bn, 0)), None, None)


def _pool_check(*, indices: bool):
    def check(node, cfg):
        a = args(node)
        if a["input"].meta["val"].dim() != 4:
            return "unbatched (3-d) pooling input"
        if not indices and a["divisor_override"] is not None:
            return "avg_pool2d with divisor_override"
        return _first_output_only(node, cfg) if indices else None

    return check


def _pair(v: Any, default: Any = None) -> list[int]:
    v = default if (v is None or v == []) else v
    v = list(v) if isinstance(v, list | tuple) else [v]
    return v * 2 if len(v) == 1 else v


@rule(aten.max_pool2d_with_indices.default, check=_pool_check(indices=True))
def max_pool2d(ctx, node):
    a = args(node)
    kernel = _pair(a["kernel_size"])
    out = R.nn.max_pool2d(
        ctx[a["input"]],
        pool_size=kernel,
        strides=_pair(a["stride"], kernel),
        padding=_pair(a["padding"]),
        dilation=_pair(a["dilation"]),
        ceil_mode=a["ceil_mode"],
    )
    return (ctx.emit(out), None)


@rule(aten.avg_pool2d.default, check=_pool_check(indices=False))
def avg_pool2d(ctx, node):
    a = args(node)
    kernel = _pair(a["kernel_size"])
    out = R.nn.avg_pool2d(
        ctx[a["input"]],
        pool_size=kernel,
        strides=_pair(a["stride"], kernel),
        padding=_pair(a["padding"]),
        ceil_mode=a["ceil_mode"],
        count_include_pad=a["count_include_pad"],
    )
    return ctx.emit(out)


def _batched_4d(node, cfg):
    return None if node.args[0].meta["val"].dim() == 4 else "unbatched (3-d) pooling input"


@rule(aten._adaptive_avg_pool2d.default, check=_batched_4d)
def adaptive_avg_pool2d(ctx, node):
    a = args(node)
    return ctx.emit(R.nn.adaptive_avg_pool2d(ctx[a["input"]], _pair(a["output_size"])))


def _pad_check(node, cfg):
    if any(p < 0 for p in args(node)["pad"]):
        return "negative padding (cropping)"
    return static_scalars(node, cfg)


@rule(aten.constant_pad_nd.default, check=_pad_check)
def constant_pad_nd(ctx, node):
    """torch lists (before, after) pairs from the last dim backwards; TVM from the first."""
    a = args(node)
    ndim = len(ctx.shape(node))
    pad = list(a["pad"])
    pairs = [pad[i : i + 2] for i in range(0, len(pad), 2)][::-1]
    width = [0] * (2 * (ndim - len(pairs))) + [p for pair in pairs for p in pair]
    return ctx.emit(R.nn.pad(ctx[a["input"]], width, "constant", float(a["value"])))


@rule(aten.embedding.default)
def embedding(ctx, node):
    a = args(node)
    return ctx.emit(R.take(ctx[a["weight"]], ctx[a["indices"]], axis=0))


@rule(aten.index_select.default, check=_not_0d)
def index_select(ctx, node):
    a = args(node)
    axis = _axis(a["dim"], ctx.val(a["input"]).dim())
    return ctx.emit(R.take(ctx[a["input"]], ctx[a["index"]], axis=axis))


def _gather_check(node, cfg):
    return "sparse_grad gather" if args(node)["sparse_grad"] else None


@rule(aten.gather.default, check=_gather_check)
def gather(ctx, node):
    a = args(node)
    axis = _axis(a["dim"], ctx.val(a["input"]).dim())
    return ctx.emit(R.gather_elements(ctx[a["input"]], ctx[a["index"]], axis=axis))
