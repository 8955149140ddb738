"""int8 rules: quantized_decomposed's quantize/dequantize ops (the QDQ form of PT2E and
graphopt's quantize pass), with PyTorch's numerics to the bit, and the integer operands of
conv/matmul kernels."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx
import tvm
from tvm import relax

from graphopt.backends.tvm.rules.common import (
    _axis,
    _cast,
    _dtype_of,
    _static_scalars,
    rule,
)
from graphopt.backends.tvm.rules.elementwise import _clamp
from graphopt.passes.base import named_args as args

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
R = relax.op


def _qdq_check(node, cfg):
    a = args(node)
    if a.get("out_dtype") not in (None, torch.float32):
        return f"dequantize to {a['out_dtype']} (TVM rule: float32)"
    if node.target is qd.quantize_per_tensor.default and not a["scale"]:
        return "quantization scale 0"
    if node.target is qd.quantize_per_channel.default:
        if a["scales"].meta["val"].dtype != torch.float32:
            return "quantize_per_channel with non-float32 scales"
    return _static_scalars(node, cfg)


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


_INT8_TYPES = (torch.uint8, torch.int8)


def _dequantized_activation(arg: Any) -> dict[str, Any] | None:
    """dequantize_per_tensor's arguments when `arg` is one of 8-bit values, else None."""
    if not (isinstance(arg, torch.fx.Node) and arg.target is qd.dequantize_per_tensor.default):
        return None
    a = args(arg)
    static = isinstance(a["scale"], float | int) and isinstance(a["zero_point"], int)
    if not static or a["out_dtype"] not in (None, torch.float32):
        return None
    return a if a["input"].meta["val"].dtype in _INT8_TYPES else None


def _per_channel_weight(arg: Any, out_axis: int) -> dict[str, Any] | None:
    """dequantize_per_channel's arguments when `arg` is one of 8-bit values whose channels
    lie along `out_axis` of `arg` (the output channels of the conv or matmul), else None.
    A transposed 2-d weight (permute [1, 0] or t, as linear layers have) counts: "transpose"
    is set in the result then."""
    transpose = False
    if isinstance(arg, torch.fx.Node) and arg.target in (aten.permute.default, aten.t.default):
        if arg.args[0].meta["val"].dim() != 2:
            return None
        if arg.target is aten.permute.default and [_axis(d, 2) for d in arg.args[1]] != [1, 0]:
            return None
        arg, transpose, out_axis = arg.args[0], True, 1 - out_axis
    if not (isinstance(arg, torch.fx.Node) and arg.target is qd.dequantize_per_channel.default):
        return None
    a = args(arg)
    ndim = a["input"].meta["val"].dim()
    if a["out_dtype"] not in (None, torch.float32) or _axis(a["axis"], ndim) != out_axis:
        return None
    if a["input"].meta["val"].dtype not in _INT8_TYPES:
        return None
    return {**a, "transpose": transpose, "channel_axis": out_axis}


def _constant_values(expr: Any) -> np.ndarray | None:
    """The values of a relax constant (a frozen weight), or None for any other expression."""
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _int8_operands(
    ctx, activation: Any, weight: dict[str, Any] | None
) -> tuple[relax.Expr, relax.Expr, relax.Expr] | None:
    """(q_x - z_x, q_w - z_w, x_scale * w_scale) for an integer conv or matmul, or None.

    `activation` must be a dequantize_per_tensor node and `weight` a `_per_channel_weight`
    match (weight zero points constant). The activation operand is int16 (8-bit values minus
    their zero point), the weight int8 as stored when its zero points are 0 (else int16):
    every product is exact and summed in int32. None, and the caller computes in float, when
    the sums could overflow int32.
    """
    act = _dequantized_activation(activation)
    if act is None or weight is None:
        return None
    zero_points = None
    if weight["zero_points"] is not None:
        zero_points = _constant_values(ctx[weight["zero_points"]])
        if zero_points is None:
            return None
        zero_points = zero_points.astype(np.int64)
    info = torch.iinfo(act["input"].meta["val"].dtype)
    zx = act["zero_point"]
    act_bound = max(abs(info.min - zx), abs(info.max - zx))
    qw = ctx[weight["input"]]
    qw_values = _constant_values(qw)
    axis = weight["channel_axis"]  # of q_w as stored (before a transpose)
    if qw_values is not None:
        w = np.moveaxis(qw_values.astype(np.int64), axis, 0).reshape(qw_values.shape[axis], -1)
        if zero_points is not None:
            w = w - zero_points.reshape(-1, 1)
        w_bound = int(np.abs(w).max(initial=0))
        row_sum = int(np.abs(w).sum(axis=1).max(initial=0))
    else:  # unknown values: the dtype's range, over the whole reduction
        winfo = torch.iinfo(weight["input"].meta["val"].dtype)
        w_bound = max(abs(winfo.min), abs(winfo.max))
        if zero_points is not None and zero_points.size:
            w_bound += int(np.abs(zero_points).max())
        shape = weight["input"].meta["val"].shape
        if any(isinstance(d, torch.SymInt) for d in shape):
            return None
        row_sum = w_bound * math.prod(shape) // max(int(shape[axis]), 1)
    if act_bound >= 1 << 15 or w_bound >= 1 << 15 or act_bound * row_sum >= 1 << 31:
        return None
    x = ctx.emit(R.subtract(R.astype(ctx[act["input"]], "int16"), ctx.const(zx, "int16")))
    if (zero_points is not None and zero_points.any()) or _dtype_of(qw) != "int8":
        qw = _cast(ctx, qw, "int16")
        if zero_points is not None:
            shape = _channel_shape(len(ctx.shape(weight["input"])), axis)
            qw = ctx.emit(R.subtract(qw, relax.const(zero_points.astype("int16").reshape(shape))))
    if weight["transpose"]:
        qw = ctx.emit(R.permute_dims(qw, [1, 0]))
    w_scale = _cast(ctx, ctx[weight["scales"]], "float32")
    scale = ctx.emit(R.multiply(w_scale, ctx.const(act["scale"], "float32")))
    return x, qw, scale


def _int8_matmul(ctx, mat1: Any, mat2: Any) -> relax.Expr | None:
    """mat1 @ mat2 as (q_x - z_x) @ q_w in int32, times x_scale * w_scale[n]; or None."""
    operands = _int8_operands(ctx, mat1, _per_channel_weight(mat2, 1))
    if operands is None:
        return None
    x, weight, scale = operands
    acc = ctx.emit(R.matmul(x, weight, out_dtype="int32"))
    return ctx.emit(R.multiply(R.astype(acc, "float32"), scale))
