"""Linear algebra, convolution, normalization and pooling rules.

float32 products ask XLA for full precision (`Precision.HIGHEST`): a TPU's default multiplies
float32 in bfloat16 passes, which would change answers silently; on CPUs it is what XLA does
anyway.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
import torch.fx
from jax import lax

from graphopt.backends.registry import static_scalars
from graphopt.backends.xla.rules.common import (
    _cast,
    _first_output_only,
    _is_float,
    _scalar,
    rule,
)
from graphopt.backends.xla.rules.quantized import int8_conv, int8_matmul
from graphopt.passes.base import named_args as args

aten = torch.ops.aten
HIGHEST = lax.Precision.HIGHEST


def _accumulator(dtype: Any) -> Any:
    """float32 for half types, else None (the dtype itself): torch's CPU GEMMs and
    convolutions accumulate half types in float32 and round once, after the bias."""
    return jnp.float32 if _is_float(dtype) and jnp.finfo(dtype).bits < 32 else None


def _matmul(x: Any, y: Any, *, wide: bool = False) -> Any:
    """x @ y; wide: a half-type product is left in float32 (a bias is added before rounding)."""
    precision = HIGHEST if _is_float(x.dtype) else None
    acc = _accumulator(x.dtype) if wide else None
    return jnp.matmul(x, y, precision=precision, preferred_element_type=acc)


@rule(aten.mm.default, aten.bmm.default)
def matmul(ctx, node):
    """mm of a dequantized activation by a dequantized weight runs in integers (int8)."""
    if node.target is aten.mm.default:
        product = int8_matmul(ctx, node.args[0], node.args[1])
        if product is not None:
            return product
    return _matmul(ctx[node.args[0]], ctx[node.args[1]])


@rule(aten.addmm.default, check=static_scalars)
def addmm(ctx, node):
    """beta * input + alpha * (mat1 @ mat2); an int8 mat1 @ mat2 runs in integers."""
    a = args(node)
    product = int8_matmul(ctx, a["mat1"], a["mat2"])
    if product is None:
        product = _matmul(ctx[a["mat1"]], ctx[a["mat2"]], wide=True)
    return _scaled_sum(ctx, node, product)


def _scaled_sum(ctx, node, product: Any) -> Any:
    """beta * input + alpha * product in the product's dtype (float32 for half types: one
    rounding, as torch's GEMM), as the node's dtype; input is not read when beta is 0 (its
    NaNs do not propagate, as torch's)."""
    a = args(node)
    dtype = product.dtype
    if a["alpha"] != 1:
        product = product * _scalar(a["alpha"], dtype)
    if a["beta"] != 0:
        bias = _cast(ctx[a["input"]], dtype)
        product = product + (bias * _scalar(a["beta"], dtype) if a["beta"] != 1 else bias)
    return product.astype(ctx.dtype(node))


@rule(aten.addmv.default, check=static_scalars)
def addmv(ctx, node):
    """beta * input + alpha * (mat @ vec)."""
    a = args(node)
    return _scaled_sum(ctx, node, _matmul(ctx[a["mat"]], ctx[a["vec"]], wide=True))


def _addbmm_check(node, cfg):
    if isinstance(args(node)["batch1"].meta["val"].shape[0], torch.SymInt):
        return "symbolic batch count"
    return static_scalars(node, cfg)


@rule(aten.addbmm.default, check=_addbmm_check)
def addbmm(ctx, node):
    """beta * input + alpha * (the sum over the batch of batch1[b] @ batch2[b]), as torch
    computes it: an addmm per batch into the output, rounded to its dtype after each."""
    a = args(node)
    x, y = ctx[a["batch1"]], ctx[a["batch2"]]
    dtype = ctx.dtype(node)
    if x.shape[0] == 0:
        return _scaled_sum(ctx, node, jnp.zeros(ctx.shape(node), dtype))
    out = _scaled_sum(ctx, node, _matmul(x[0], y[0], wide=True))

    def step(out, pair):
        product = _matmul(*pair, wide=True)
        if a["alpha"] != 1:
            product = product * _scalar(a["alpha"], product.dtype)
        return (product + out.astype(product.dtype)).astype(dtype), None

    return lax.scan(step, out, (x[1:], y[1:]))[0]


def _conv_check(node, cfg):
    a = args(node)
    if a["input"].meta["val"].dim() != a["weight"].meta["val"].dim():
        return "unbatched convolution input"
    if a["transposed"] and a["input"].meta["val"].dtype in (torch.float16, torch.bfloat16):
        return "half-type transposed convolution (torch's kernel rounds its partial sums)"
    for key in ("stride", "padding", "dilation", "output_padding"):
        if any(isinstance(v, torch.SymInt) for v in a[key]):
            return f"symbolic convolution {key}"
    return None


def _conv_dimensions(ndim: int) -> tuple[str, str, str]:
    spatial = "DHW"[3 - (ndim - 2) :]
    return ("NC" + spatial, "OI" + spatial, "NC" + spatial)


@rule(aten.convolution.default, check=_conv_check)
def convolution(ctx, node):
    """N-d convolution, transposed too; a dequantized activation convolved with a dequantized
    weight runs in integers (int8)."""
    a = args(node)
    ndim = ctx.ndim(node)
    spatial = ndim - 2

    def per_dim(key):
        return tuple(a[key]) * (1 if len(a[key]) == spatial else spatial)

    if a["transposed"]:
        return _conv_transpose(ctx, node, per_dim)
    attrs = {
        "window_strides": per_dim("stride"),
        "padding": [(p, p) for p in per_dim("padding")],
        "rhs_dilation": per_dim("dilation"),
        "dimension_numbers": _conv_dimensions(ndim),
        "feature_group_count": a["groups"],
    }
    out = int8_conv(ctx, a["input"], a["weight"], attrs)
    if out is None:
        x = ctx[a["input"]]
        precision = HIGHEST if _is_float(x.dtype) else None
        acc = _accumulator(x.dtype)
        out = lax.conv_general_dilated(
            x, ctx[a["weight"]], precision=precision, preferred_element_type=acc, **attrs
        )
    return _add_bias(ctx, node, out)


def _add_bias(ctx, node, out: Any) -> Any:
    """out + bias over the channels in out's dtype (float32 for half types: rounded once, as
    torch's), as the node's dtype."""
    bias = args(node)["bias"]
    if bias is not None:
        out = out + _cast(ctx[bias], out.dtype).reshape((1, -1) + (1,) * (out.ndim - 2))
    return out.astype(ctx.dtype(node))


def _conv_transpose(ctx, node, per_dim):
    """The transposed convolution as a convolution of the input dilated by the stride with the
    flipped kernel, its in/out channels swapped within each group (weight [in, out/groups,
    k...] -> [out, in/groups, k...]), padded by dilation * (k - 1) - padding on each side and
    output_padding more on the right (negative padding crops)."""
    a = args(node)
    x, w = ctx[a["input"]], ctx[a["weight"]]
    spatial, groups = x.ndim - 2, a["groups"]
    kernel, dilation = w.shape[2:], per_dim("dilation")
    cin, cout = w.shape[0], w.shape[1]
    w = w.reshape((groups, cin // groups, cout, *kernel)).swapaxes(1, 2)
    w = jnp.flip(w.reshape((groups * cout, cin // groups, *kernel)), tuple(range(2, 2 + spatial)))
    pads = [
        (d * (k - 1) - p, d * (k - 1) - p + extra)
        for d, k, p, extra in zip(dilation, kernel, per_dim("padding"), per_dim("output_padding"))
    ]
    out = lax.conv_general_dilated(
        x,
        w,
        window_strides=(1,) * spatial,
        padding=pads,
        lhs_dilation=per_dim("stride"),
        rhs_dilation=dilation,
        dimension_numbers=_conv_dimensions(x.ndim),
        feature_group_count=groups,
        precision=HIGHEST if _is_float(x.dtype) else None,
        preferred_element_type=_accumulator(x.dtype),
    )
    return _add_bias(ctx, node, out)


def _stats(x: Any, axes: tuple[int, ...], eps: float) -> tuple[Any, Any, Any]:
    """(x - mean) * rstd, mean, rstd over `axes`, in float32 at least (as torch's CPU kernels
    accumulate half and bfloat16)."""
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(wide, axis=axes, keepdims=True)
    centered = wide - mean
    rstd = lax.rsqrt(jnp.mean(centered * centered, axis=axes, keepdims=True) + eps)
    return centered * rstd, mean, rstd


@rule(aten.native_layer_norm.default)
def layer_norm(ctx, node):
    """(out, mean, rstd): mean and rstd keep the normalized dims as 1s."""
    a = args(node)
    x = ctx[a["input"]]
    n = len(a["normalized_shape"])
    normed, mean, rstd = _stats(x, tuple(range(x.ndim - n, x.ndim)), a["eps"])
    if a["weight"] is not None:
        normed = normed * ctx[a["weight"]]
    if a["bias"] is not None:
        normed = normed + ctx[a["bias"]]
    out_val, mean_val, rstd_val = ctx.val(node)
    return (
        normed.astype(x.dtype),
        _cast(mean, ctx.dtype(mean_val)),
        _cast(rstd, ctx.dtype(rstd_val)),
    )


@rule(aten.native_group_norm.default)
def group_norm(ctx, node):
    """(out, mean, rstd): mean and rstd are [N, groups]."""
    a = args(node)
    x = ctx[a["input"]]
    n, groups = x.shape[0], a["group"]
    grouped = x.reshape((n, groups, math.prod(x.shape[1:]) // groups))  # no -1: n may be 0
    normed, mean, rstd = _stats(grouped, (2,), a["eps"])
    normed = normed.reshape(x.shape)
    affine = (1, -1) + (1,) * (x.ndim - 2)
    if a["weight"] is not None:
        normed = normed * ctx[a["weight"]].reshape(affine)
    if a["bias"] is not None:
        normed = normed + ctx[a["bias"]].reshape(affine)
    _, mean_val, rstd_val = ctx.val(node)
    return (
        normed.astype(x.dtype),
        _cast(mean.reshape((n, groups)), ctx.dtype(mean_val)),
        _cast(rstd.reshape((n, groups)), ctx.dtype(rstd_val)),
    )


@rule(aten._native_batch_norm_legit_no_training.default)
def batch_norm(ctx, node):
    """Inference batch norm as torch's CPU kernel computes it: x * alpha + beta per channel,
    alpha = weight / sqrt(var + eps), beta = bias - mean * alpha, in float32 at least (half
    types rounded once); (out, empty, empty) as torch's."""
    a = args(node)
    x = ctx[a["input"]]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    shape = (1, -1) + (1,) * (x.ndim - 2)

    def param(name):
        return None if a[name] is None else _cast(ctx[a[name]], acc).reshape(shape)

    alpha = 1 / jnp.sqrt(param("running_var") + jnp.asarray(a["eps"], acc))
    if a["weight"] is not None:
        alpha = alpha * param("weight")
    beta = -param("running_mean") * alpha
    if a["bias"] is not None:
        beta = beta + param("bias")
    out = x.astype(acc) * alpha + beta
    _, v1, v2 = ctx.val(node)
    empty = [jnp.zeros(tuple(ctx.dim(d) for d in v.shape), ctx.dtype(v)) for v in (v1, v2)]
    return (out.astype(x.dtype), *empty)


def _pool_geometry(size, kernel, stride, padding, dilation, ceil_mode):
    """(output size, right padding) of one pooled dim, torch's formula (a window may not start
    in the right padding)."""
    span = dilation * (kernel - 1) + 1
    numerator = size + 2 * padding - span
    out = (-(-numerator // stride) if ceil_mode else numerator // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    right = max((out - 1) * stride + span - size - padding, 0)
    return out, right


def _pool_args(node, spatial: int) -> tuple[list, list, list, list]:
    a = args(node)

    def expand(value, default):
        value = list(value) if value else list(default)
        return value * spatial if len(value) == 1 else value

    kernel = expand(a["kernel_size"], ())
    stride = expand(a.get("stride"), kernel)
    padding = expand(a.get("padding", [0]), [0])
    dilation = expand(a.get("dilation", [1]), [1])
    return kernel, stride, padding, dilation


def _static_input(node, cfg):
    """Pooling geometry is computed here: the spatial sizes must be static (batch and
    channels may be dynamic)."""
    shape = node.args[0].meta["val"].shape
    if any(isinstance(d, torch.SymInt) for d in shape[-_spatial(node) :]):
        return "symbolic spatial size"
    return None


def _spatial(node) -> int:
    """The pooled dims of a pool op: the last 2 (2d) or 3 (3d); batched or not."""
    return 3 if "3d" in str(node.target) else 2


@rule(
    aten.max_pool2d_with_indices.default,
    aten.max_pool3d_with_indices.default,
    check=_static_input,
)
def max_pool(ctx, node):
    """(values, indices); the indices (flat within each pooled plane) only when they are
    read, as a reduction over (value, index) pairs."""
    x = ctx[node.args[0]]
    spatial = _spatial(node)
    lead = x.ndim - spatial
    kernel, stride, padding, dilation = _pool_args(node, spatial)
    ceil_mode = args(node)["ceil_mode"]
    pads = [(0, 0)] * lead
    for i in range(spatial):
        _, right = _pool_geometry(
            x.shape[lead + i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode
        )
        pads.append((padding[i], right))
    init = jnp.asarray(-jnp.inf if _is_float(x.dtype) else jnp.iinfo(x.dtype).min, x.dtype)
    window = dict(
        window_dimensions=(1,) * lead + tuple(kernel),
        window_strides=(1,) * lead + tuple(stride),
        padding=pads,
        window_dilation=(1,) * lead + tuple(dilation),
    )
    if _first_output_only(node, ctx.cfg) is None:
        return (lax.reduce_window(x, init, lax.max, **window), None)
    flat = jnp.zeros(x.shape, jnp.int64)
    for d in range(lead, x.ndim):
        flat = flat * x.shape[d] + lax.broadcasted_iota(jnp.int64, x.shape, d)
    values, indices = lax.reduce_window(
        (x, flat), (init, jnp.asarray(jnp.iinfo(jnp.int64).max)), _argmax_pair, **window
    )
    return values, indices


def _argmax_pair(a: tuple[Any, Any], b: tuple[Any, Any]) -> tuple[Any, Any]:
    """The (value, index) torch's max pool keeps of two: a NaN (of two NaNs the later one, as
    its scan replaces a NaN by the next), else the larger value, of equal values the first
    (padding, index int64 max, loses every tie)."""
    (va, ia), (vb, ib) = a, b
    nan_a, nan_b = va != va, vb != vb
    take_a = jnp.where(
        nan_a | nan_b,
        nan_a & (~nan_b | (ia > ib)),
        (va > vb) | ((va == vb) & (ia < ib)),
    )
    return jnp.where(take_a, va, vb), jnp.where(take_a, ia, ib)


@rule(aten.avg_pool2d.default, aten.avg_pool3d.default, check=_static_input)
def avg_pool(ctx, node):
    """Window sums over the count of cells each window covers: the padding counts when
    count_include_pad (up to the padded edge, never the extra cells of ceil_mode).

    As torch's CPU kernels: half types summed and divided in float32, rounded once; int64
    summed in int64 and divided by C's truncating division (-7 / 4 is -1)."""
    a = args(node)
    x = ctx[a["input"]]
    dtype = x.dtype
    if _is_float(dtype) and jnp.finfo(dtype).bits < 32:
        x = x.astype(jnp.float32)
    divide = jnp.true_divide if _is_float(dtype) else _truncating_divide
    spatial = _spatial(node)
    lead = x.ndim - spatial
    kernel, stride, padding, _ = _pool_args(node, spatial)
    pads, masks = [(0, 0)] * lead, []
    for i in range(spatial):
        size, p = x.shape[lead + i], padding[i]
        _, right = _pool_geometry(size, kernel[i], stride[i], p, 1, a["ceil_mode"])
        pads.append((p, right))
        cells = np.arange(p + size + right)
        counted = (
            cells < size + 2 * p if a["count_include_pad"] else (cells >= p) & (cells < p + size)
        )
        masks.append(counted.astype(np.float64))
    zero = jnp.asarray(0, x.dtype)
    window, strides = (1,) * lead + tuple(kernel), (1,) * lead + tuple(stride)
    sums = lax.reduce_window(x, zero, lax.add, window, strides, pads)
    if a["divisor_override"]:
        return divide(sums, jnp.asarray(a["divisor_override"], x.dtype)).astype(dtype)
    mask = functools.reduce(np.multiply.outer, masks)
    counts = lax.reduce_window(
        jnp.asarray(mask, x.dtype), zero, lax.add, tuple(kernel), tuple(stride), "VALID"
    )
    return divide(sums, counts).astype(dtype)


def _truncating_divide(x: Any, y: Any) -> Any:
    """Integer division rounding toward zero (C's), broadcasting as jnp does."""
    return lax.div(*jnp.broadcast_arrays(x, y))


def _adaptive_check(node, cfg):
    spatial = len(node.args[1])
    if any(isinstance(d, torch.SymInt) for d in node.args[0].meta["val"].shape[-spatial:]):
        return "symbolic spatial size"
    return None


@rule(aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default, check=_adaptive_check)
def adaptive_avg_pool(ctx, node):
    """Each output cell averages input[floor(i * L / O) : ceil((i + 1) * L / O)] in every
    spatial dim: the mean over the box is the mean, dim after dim, of the means over its
    sides (half types in float32, as torch's)."""
    x = ctx[node.args[0]]
    dtype, sizes = x.dtype, list(node.args[1])
    x = x.astype(jnp.promote_types(dtype, jnp.float32)) if _is_float(dtype) else x
    first = x.ndim - len(sizes)
    if all(x.shape[first + i] % out == 0 for i, out in enumerate(sizes)):
        shape, axes = list(x.shape[:first]), []
        for i, out in enumerate(sizes):
            shape += [out, x.shape[first + i] // out]
            axes.append(first + 2 * i + 1)
        return jnp.mean(x.reshape(shape), axis=tuple(axes)).astype(dtype)
    for i, out in enumerate(sizes):
        axis, size = first + i, x.shape[first + i]
        cells = []
        for j in range(out):
            start, end = (j * size) // out, -(-((j + 1) * size) // out)
            cells.append(jnp.mean(lax.slice_in_dim(x, start, end, axis=axis), axis=axis))
        x = jnp.stack(cells, axis=axis)
    return x.astype(dtype)
