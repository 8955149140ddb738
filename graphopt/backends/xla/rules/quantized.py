"""int8 rules: quantized_decomposed's quantize/dequantize ops (the QDQ form of PT2E and
graphopt's quantize pass) with PyTorch's numerics to the bit, and the integer operands of
convolutions and matmuls: int32 accumulation, as the TVM rules compute them
(`graphopt/backends/tvm/rules/quantized.py`), so both give the same numbers."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx
from jax import lax

from graphopt.backends import int8_operands
from graphopt.backends.xla.rules.common import _axis, _cast, rule
from graphopt.backends.xla.rules.elementwise import _clamp
from graphopt.passes.base import named_args as args

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
_qdq_check = int8_operands.qdq_check("XLA")


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


def _int8_operands(ctx, activation: Any, weight: Any, out_axis: int) -> tuple | None:
    """(q_x - z_x, q_w - z_w, x_scale * w_scale) for an integer conv or matmul reading
    `activation` and `weight` (output channels along `out_axis`), or None: the layer computes
    in float (`int8_operands.match` says when). As the TVM rules: both operands int16, every
    product exact and summed in int32."""
    m = int8_operands.match(activation, weight, out_axis, ctx.constant)
    if m is None:
        return None
    x = ctx[m.x].astype(jnp.int16) - jnp.int16(m.x_zero_point)
    qw = ctx[m.weight].astype(jnp.int16)
    if m.zero_points is not None and m.zero_points.any():
        shape = _channel_shape(ctx.ndim(m.weight), m.channel_axis)
        qw = qw - jnp.asarray(m.zero_points.astype(np.int16).reshape(shape))
    if m.transpose:
        qw = qw.T
    scale = ctx[m.scales].astype(jnp.float32) * jnp.float32(m.x_scale)
    return x, qw, scale


def int8_matmul(ctx, mat1: Any, mat2: Any) -> Any | None:
    """mat1 @ mat2 as (q_x - z_x) @ q_w in int32, times x_scale * w_scale[n]; or None."""
    operands = _int8_operands(ctx, mat1, mat2, 1)
    if operands is None:
        return None
    x, weight, scale = operands
    acc = jnp.matmul(x, weight, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * scale


def int8_conv(ctx, activation: Any, weight: Any, attrs: dict[str, Any]) -> Any | None:
    """conv(activation, weight) in int32 from the 8-bit values, times the scales; or None."""
    operands = _int8_operands(ctx, activation, weight, 0)
    if operands is None:
        return None
    x, qw, scale = operands
    acc = lax.conv_general_dilated(x, qw, preferred_element_type=jnp.int32, **attrs)
    return acc.astype(jnp.float32) * scale.reshape((1, -1) + (1,) * (acc.ndim - 2))
