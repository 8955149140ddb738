"""Linear algebra, convolution, normalization and pooling rules.

float32 products ask XLA for full precision (`Precision.HIGHEST`): a TPU's default multiplies
float32 in bfloat16 passes, which would change answers silently; on CPUs it is what XLA does
anyway.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
import torch.fx
from jax import lax

from graphopt.backends.xla.rules.common import _cast, _first_output_only, _is_float, rule
from graphopt.backends.xla.rules.elementwise import _static_scalars
from graphopt.backends.xla.rules.quantized import int8_conv, int8_matmul
from graphopt.passes.base import named_args as args

aten = torch.ops.aten
HIGHEST = lax.Precision.HIGHEST


def _matmul(x: Any, y: Any) -> Any:
    return jnp.matmul(x, y, precision=HIGHEST if _is_float(x.dtype) else None)


@rule(aten.mm.default, aten.bmm.default)
def matmul(ctx, node):
    """mm of a dequantized activation by a dequantized weight runs in integers (int8)."""
    if node.target is aten.mm.default:
        product = int8_matmul(ctx, node.args[0], node.args[1])
        if product is not None:
            return product
    return _matmul(ctx[node.args[0]], ctx[node.args[1]])


@rule(aten.addmm.default, check=_static_scalars)
def addmm(ctx, node):
    """beta * input + alpha * (mat1 @ mat2); an int8 mat1 @ mat2 runs in integers."""
    a = args(node)
    product = int8_matmul(ctx, a["mat1"], a["mat2"])
    if product is None:
        product = _matmul(ctx[a["mat1"]], ctx[a["mat2"]])
    dtype = product.dtype
    if a["alpha"] != 1:
        product = product * jnp.asarray(a["alpha"], dtype)
    if a["beta"] == 0:
        return product
    bias = ctx[a["input"]]
    if a["beta"] != 1:
        bias = bias * jnp.asarray(a["beta"], dtype)
    return product + bias


def _conv_check(node, cfg):
    a = args(node)
    if a["transposed"]:
        return "transposed convolution is not lowered to XLA"
    if a["input"].meta["val"].dim() != a["weight"].meta["val"].dim():
        return "unbatched convolution input"
    for key in ("stride", "padding", "dilation"):
        if any(isinstance(v, torch.SymInt) for v in a[key]):
            return f"symbolic convolution {key}"
    return None


def _conv_dimensions(ndim: int) -> tuple[str, str, str]:
    spatial = "DHW"[3 - (ndim - 2) :]
    return ("NC" + spatial, "OI" + spatial, "NC" + spatial)


@rule(aten.convolution.default, check=_conv_check)
def convolution(ctx, node):
    """N-d convolution; a dequantized activation convolved with a dequantized weight runs in
    integers (int8)."""
    a = args(node)
    ndim = ctx.ndim(node)
    spatial = ndim - 2
    attrs = {
        "window_strides": tuple(a["stride"]) * (1 if len(a["stride"]) == spatial else spatial),
        "padding": [(p, p) for p in (a["padding"] * (spatial if len(a["padding"]) == 1 else 1))],
        "rhs_dilation": tuple(a["dilation"]) * (1 if len(a["dilation"]) == spatial else spatial),
        "dimension_numbers": _conv_dimensions(ndim),
        "feature_group_count": a["groups"],
    }
    out = int8_conv(ctx, a["input"], a["weight"], attrs)
    if out is None:
        x = ctx[a["input"]]
        precision = HIGHEST if _is_float(x.dtype) else None
        out = lax.conv_general_dilated(x, ctx[a["weight"]], precision=precision, **attrs)
    if a["bias"] is None:
        return out
    bias = ctx[a["bias"]].reshape((1, -1) + (1,) * spatial)
    return out + bias


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
    grouped = x.reshape((n, groups, -1))
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
    """Inference batch norm: (out, empty, empty) as torch's."""
    a = args(node)
    x = ctx[a["input"]]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    rstd = lax.rsqrt(ctx[a["running_var"]].reshape(shape) + a["eps"])
    out = (x - ctx[a["running_mean"]].reshape(shape)) * rstd
    if a["weight"] is not None:
        out = out * ctx[a["weight"]].reshape(shape)
    if a["bias"] is not None:
        out = out + ctx[a["bias"]].reshape(shape)
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
    if any(isinstance(d, torch.SymInt) for d in node.args[0].meta["val"].shape[2:]):
        return "symbolic spatial size"
    return None


def _max_pool_check(node, cfg):
    return _first_output_only(node, cfg) or _static_input(node, cfg)


@rule(
    aten.max_pool2d_with_indices.default,
    aten.max_pool3d_with_indices.default,
    check=_max_pool_check,
)
def max_pool(ctx, node):
    """(values, None): the indices are not computed (inference reads the values only)."""
    x = ctx[node.args[0]]
    spatial = x.ndim - 2
    kernel, stride, padding, dilation = _pool_args(node, spatial)
    ceil_mode = args(node)["ceil_mode"]
    pads = [(0, 0), (0, 0)]
    for i in range(spatial):
        _, right = _pool_geometry(
            x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode
        )
        pads.append((padding[i], right))
    init = -jnp.inf if _is_float(x.dtype) else jnp.iinfo(x.dtype).min
    out = lax.reduce_window(
        x,
        jnp.asarray(init, x.dtype),
        lax.max,
        (1, 1, *kernel),
        (1, 1, *stride),
        pads,
        window_dilation=(1, 1, *dilation),
    )
    return (out, None)


@rule(aten.avg_pool2d.default, aten.avg_pool3d.default, check=_static_input)
def avg_pool(ctx, node):
    """Window sums over the count of cells each window covers: the padding counts when
    count_include_pad (up to the padded edge, never the extra cells of ceil_mode)."""
    a = args(node)
    x = ctx[a["input"]]
    spatial = x.ndim - 2
    kernel, stride, padding, _ = _pool_args(node, spatial)
    pads, masks = [(0, 0), (0, 0)], []
    for i in range(spatial):
        size, p = x.shape[2 + i], padding[i]
        _, right = _pool_geometry(size, kernel[i], stride[i], p, 1, a["ceil_mode"])
        pads.append((p, right))
        cells = np.arange(p + size + right)
        counted = (
            cells < size + 2 * p if a["count_include_pad"] else (cells >= p) & (cells < p + size)
        )
        masks.append(counted.astype(np.float64))
    zero = jnp.asarray(0, x.dtype)
    window, strides = (1, 1, *kernel), (1, 1, *stride)
    sums = lax.reduce_window(x, zero, lax.add, window, strides, pads)
    if a["divisor_override"]:
        return sums / jnp.asarray(a["divisor_override"], x.dtype)
    mask = functools.reduce(np.multiply.outer, masks)
    counts = lax.reduce_window(
        jnp.asarray(mask, x.dtype), zero, lax.add, tuple(kernel), tuple(stride), "VALID"
    )
    return sums / counts


@rule(aten._adaptive_avg_pool2d.default, check=_static_input)
def adaptive_avg_pool2d(ctx, node):
    """Each output cell averages input[floor(i * L / O) : ceil((i + 1) * L / O)]."""
    x = ctx[node.args[0]]
    out_h, out_w = node.args[1]
    h, w = x.shape[-2:]
    if h % out_h == 0 and w % out_w == 0:
        shape = x.shape[:-2] + (out_h, h // out_h, out_w, w // out_w)
        return jnp.mean(x.reshape(shape), axis=(-3, -1))

    def bounds(i, size, out):
        return (i * size) // out, -(-((i + 1) * size) // out)

    rows = []
    for i in range(out_h):
        r0, r1 = bounds(i, h, out_h)
        cells = []
        for j in range(out_w):
            c0, c1 = bounds(j, w, out_w)
            cells.append(jnp.mean(x[..., r0:r1, c0:c1], axis=(-2, -1)))
        rows.append(jnp.stack(cells, axis=-1))
    return jnp.stack(rows, axis=-2)
