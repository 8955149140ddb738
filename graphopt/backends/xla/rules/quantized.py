"""int8 rules: quantized_decomposed's quantize/dequantize ops (the QDQ form of PT2E and
graphopt's quantize pass) with PyTorch's numerics to the bit, and the integer operands of
convolutions and matmuls: int32 accumulation, as the TVM rules compute them
(`graphopt/backends/tvm/rules/quantized.py`), so both give the same numbers."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx
from jax import lax

from graphopt.backends.xla.rules.common import _axis, _cast, rule
from graphopt.backends.xla.rules.elementwise import _clamp, _static_scalars
from graphopt.passes.base import named_args as args

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed


def _qdq_check(node, cfg):
    a = args(node)
    if a.get("out_dtype") not in (None, torch.float32):
        return f"dequantize to {a['out_dtype']} (XLA rule: float32)"
    if node.target is qd.quantize_per_tensor.default and not a["scale"]:
        return "quantization scale 0"
    if node.target is qd.quantize_per_channel.default:
        if a["scales"].meta["val"].dtype != torch.float32:
            return "quantize_per_channel with non-float32 scales"
    return _static_scalars(node, cfg)


def _quantize(ctx, x: Any, inv_scale: Any, zero_point: Any, node) -> Any:
    """clamp(round(x * inv_scale) + zero_point, qmin, qmax) as the node's integer dtype.

    As quantized_decomposed computes it: in float32, the reciprocal scale rounded to float32,
    round half to even (jnp.round), then a saturating cast."""
    a = args(node)
    shifted = jnp.round(_cast(x, jnp.float32) * inv_scale) + zero_point
    return _clamp(shifted, float(a["quant_min"]), float(a["quant_max"])).astype(ctx.dtype(node))


def _channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    """The shape per-channel parameters take to broadcast along `axis` of an ndim tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


@rule(qd.quantize_per_tensor.default, check=_qdq_check)
def quantize_per_tensor(ctx, node):
    a = args(node)
    inv_scale = jnp.float32(np.float32(1.0 / a["scale"]))  # as torch's mul
    return _quantize(ctx, ctx[a["input"]], inv_scale, jnp.float32(a["zero_point"]), node)


@rule(qd.dequantize_per_tensor.default, check=_qdq_check)
def dequantize_per_tensor(ctx, node):
    """(q as float32 - zero_point) * scale."""
    a = args(node)
    q = ctx[a["input"]].astype(jnp.float32)
    return (q - jnp.float32(a["zero_point"])) * jnp.float32(a["scale"])


@rule(qd.quantize_per_channel.default, check=_qdq_check)
def quantize_per_channel(ctx, node):
    """input * (1 / scales) (a float32 reciprocal tensor, as torch's), + zero points, clamp."""
    a = args(node)
    ndim = ctx.ndim(node)
    shape = _channel_shape(ndim, _axis(a["axis"], ndim))
    inv_scale = jnp.float32(1.0) / ctx[a["scales"]].reshape(shape)
    zero_point = _cast(ctx[a["zero_points"]], jnp.float32).reshape(shape)
    return _quantize(ctx, ctx[a["input"]], inv_scale, zero_point, node)


@rule(qd.dequantize_per_channel.default, check=_qdq_check)
def dequantize_per_channel(ctx, node):
    """(q - zero_points) in int64, times scales in their dtype, as float32."""
    a = args(node)
    ndim = ctx.ndim(node)
    shape = _channel_shape(ndim, _axis(a["axis"], ndim))
    scales = ctx[a["scales"]].reshape(shape)
    q = ctx[a["input"]]
    if a["zero_points"] is not None:
        q = q.astype(jnp.int64) - ctx[a["zero_points"]].astype(jnp.int64).reshape(shape)
    return (q.astype(scales.dtype) * scales).astype(jnp.float32)


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
    lie along `out_axis` (the output channels of the conv or matmul), else None. A transposed
    2-d weight (permute [1, 0] or t, as linear layers have) counts: "transpose" is set."""
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


def _int8_operands(ctx, activation: Any, weight: dict[str, Any] | None) -> tuple | None:
    """(q_x - z_x, q_w - z_w, x_scale * w_scale) for an integer conv or matmul, or None.

    As the TVM rules: the activation operand is int16 (8-bit values minus their zero point),
    the weight int16 (its zero points subtracted), every product exact and summed in int32.
    None, and the caller computes in float, when the sums could overflow int32. The weight's
    values are read from the graph's constants when it is one (a frozen weight)."""
    act = _dequantized_activation(activation)
    if act is None or weight is None:
        return None
    zero_points = None
    if weight["zero_points"] is not None:
        zero_points = ctx.constant(weight["zero_points"])
        if zero_points is None:
            return None
        zero_points = zero_points.astype(np.int64)
    info = torch.iinfo(act["input"].meta["val"].dtype)
    zx = act["zero_point"]
    act_bound = max(abs(info.min - zx), abs(info.max - zx))
    qw_values = ctx.constant(weight["input"])
    axis = weight["channel_axis"]
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
    x = ctx[act["input"]].astype(jnp.int16) - jnp.int16(zx)
    qw = ctx[weight["input"]].astype(jnp.int16)
    if zero_points is not None and zero_points.any():
        shape = _channel_shape(weight["input"].meta["val"].dim(), axis)
        qw = qw - jnp.asarray(zero_points.astype(np.int16).reshape(shape))
    if weight["transpose"]:
        qw = qw.T
    scale = ctx[weight["scales"]].astype(jnp.float32) * jnp.float32(act["scale"])
    return x, qw, scale


def int8_matmul(ctx, mat1: Any, mat2: Any) -> Any | None:
    """mat1 @ mat2 as (q_x - z_x) @ q_w in int32, times x_scale * w_scale[n]; or None."""
    operands = _int8_operands(ctx, mat1, _per_channel_weight(mat2, 1))
    if operands is None:
        return None
    x, weight, scale = operands
    acc = jnp.matmul(x, weight, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * scale


def int8_conv(ctx, activation: Any, weight: Any, attrs: dict[str, Any]) -> Any | None:
    """conv(activation, weight) in int32 from the 8-bit values, times the scales; or None."""
    operands = _int8_operands(ctx, activation, _per_channel_weight(weight, 0))
    if operands is None:
        return None
    x, qw, scale = operands
    acc = lax.conv_general_dilated(x, qw, preferred_element_type=jnp.int32, **attrs)
    return acc.astype(jnp.float32) * scale.reshape((1, -1) + (1,) * (acc.ndim - 2))
