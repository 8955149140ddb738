"""int8 rules: quantized_decomposed's quantize/dequantize ops (the QDQ form of PT2E and
graphopt's quantize pass), with PyTorch's numerics to the bit, and the integer operands of
conv/matmul kernels."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx
import tvm
from tvm import relax

from graphopt.backends import int8_operands
from graphopt.backends.tvm.rules.common import (
    _axis,
    _cast,
    _dtype_of,
    rule,
)
from graphopt.backends.tvm.rules.elementwise import _clamp
from graphopt.passes.base import named_args as args

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
R = relax.op
_qdq_check = int8_operands.qdq_check("TVM")


def _quantize(ctx, x: relax.Expr, inv_scale: relax.Expr, zero_point: relax.Expr, node):
    """clamp(round(x * inv_scale) + zero_point, qmin, qmax) as the node's integer dtype.

    As quantized_decomposed computes it: in float32, the reciprocal scale rounded to float32,
    round half to even, then a saturating cast. relax's round legalizes to topi.round, which is
    tirx.nearbyint (ties to even) on every target; tirx.round would be roundf on CUDA.
    """
    a = args(node)
    x = _cast(ctx, x, "float32")
    rounded = ctx.emit(R.round(R.multiply(x, inv_scale)))
    shifted = ctx.emit(R.add(rounded, zero_point))
    clamped = _clamp(ctx, shifted, float(a["quant_min"]), float(a["quant_max"]))
    return ctx.emit(R.astype(clamped, ctx.dtype(node)))


def _channel_shape(ndim: int, axis: int) -> list[int]:
    """The shape per-channel parameters take to broadcast along `axis` of an ndim tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return shape


@rule(qd.quantize_per_tensor.default, check=_qdq_check)
def quantize_per_tensor(ctx, node):
    a = args(node)
    inv_scale = ctx.const(float(np.float32(1.0 / a["scale"])), "float32")  # as torch's mul
    zero_point = ctx.const(float(a["zero_point"]), "float32")
    return _quantize(ctx, ctx[a["input"]], inv_scale, zero_point, node)


@rule(qd.dequantize_per_tensor.default, check=_qdq_check)
def dequantize_per_tensor(ctx, node):
    """(q as float32 - zero_point) * scale."""
    a = args(node)
    x = ctx.emit(
        R.subtract(R.astype(ctx[a["input"]], "float32"), ctx.const(a["zero_point"], "float32"))
    )
    return ctx.emit(R.multiply(x, ctx.const(a["scale"], "float32")))


@rule(qd.quantize_per_channel.default, check=_qdq_check)
def quantize_per_channel(ctx, node):
    """input * (1 / scales) (a float32 reciprocal tensor, as torch's), + zero points, clamp."""
    a = args(node)
    shape = _channel_shape(len(ctx.shape(node)), _axis(a["axis"], len(ctx.shape(node))))
    scales = ctx.emit(R.reshape(ctx[a["scales"]], shape))
    inv_scale = ctx.emit(R.divide(relax.const(1.0, "float32"), scales))
    zero_point = ctx.emit(R.reshape(_cast(ctx, ctx[a["zero_points"]], "float32"), shape))
    return _quantize(ctx, ctx[a["input"]], inv_scale, zero_point, node)


@rule(qd.dequantize_per_channel.default, check=_qdq_check)
def dequantize_per_channel(ctx, node):
    """(q - zero_points) in int64, times scales in their dtype, as float32."""
    a = args(node)
    ndim = len(ctx.shape(node))
    shape = _channel_shape(ndim, _axis(a["axis"], ndim))
    scales = ctx.emit(R.reshape(ctx[a["scales"]], shape))
    q = ctx[a["input"]]
    if a["zero_points"] is not None:
        zero_points = ctx.emit(R.reshape(_cast(ctx, ctx[a["zero_points"]], "int64"), shape))
        q = ctx.emit(R.subtract(_cast(ctx, q, "int64"), zero_points))
    out = ctx.emit(R.multiply(_cast(ctx, q, _dtype_of(scales)), scales))
    return _cast(ctx, out, "float32")


def _constant_values(expr: Any) -> np.ndarray | None:
    """The values of a relax constant (a frozen weight), or None for any other expression."""
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _int8_operands(
    ctx, activation: Any, weight: Any, out_axis: int
) -> tuple[relax.Expr, relax.Expr, relax.Expr] | None:
    """(q_x - z_x, q_w - z_w, x_scale * w_scale) for an integer conv or matmul reading
    `activation` and `weight` (output channels along `out_axis`), or None: the layer computes
    in float (`int8_operands.match` says when). The activation operand is int16, the weight
    int8 as stored when its zero points are 0 (else int16): every product is exact and summed
    in int32."""
    m = int8_operands.match(activation, weight, out_axis, lambda n: _constant_values(ctx[n]))
    if m is None:
        return None
    x = ctx.emit(R.subtract(R.astype(ctx[m.x], "int16"), ctx.const(m.x_zero_point, "int16")))
    qw = ctx[m.weight]
    if (m.zero_points is not None and m.zero_points.any()) or _dtype_of(qw) != "int8":
        qw = _cast(ctx, qw, "int16")
        if m.zero_points is not None:
            shape = _channel_shape(len(ctx.shape(m.weight)), m.channel_axis)
            zero_points = relax.const(m.zero_points.astype("int16").reshape(shape))
            qw = ctx.emit(R.subtract(qw, zero_points))
    if m.transpose:
        qw = ctx.emit(R.permute_dims(qw, [1, 0]))
    w_scale = _cast(ctx, ctx[m.scales], "float32")
    scale = ctx.emit(R.multiply(w_scale, ctx.const(m.x_scale, "float32")))
    return x, qw, scale


def _int8_matmul(ctx, mat1: Any, mat2: Any) -> relax.Expr | None:
    """mat1 @ mat2 as (q_x - z_x) @ q_w in int32, times x_scale * w_scale[n]; or None."""
    operands = _int8_operands(ctx, mat1, mat2, 1)
    if operands is None:
        return None
    x, weight, scale = operands
    acc = ctx.emit(R.matmul(x, weight, out_dtype="int32"))
    return ctx.emit(R.multiply(R.astype(acc, "float32"), scale))
