"""Rules for graphopt's quantized linear layers (`graphopt/quantized_linear.py`): weight-only
int8 and int4, and the integer matmul of dynamic int8.

The weights stay 1 or 0.5 byte each in the program's parameters (and in a StableHLO artifact's
weights file); the program widens them next to the matmul, as the ops' reference
implementations compute it: the dequantized weight in float32 (`q * scale`, or `(q - zero) *
scale` per group for int4), cast to the activation's dtype, then the matmul. XLA fuses the
widening into the dot's operand on TPUs and GPUs; on a CPU it materializes the float weight
per call, so XLA:CPU is a correctness path for these layers, not a fast one (graphopt's own CPU
kernels are `target="cpu"`).

Dynamic int8 (`graphopt::linear_int8_dynamic`, or its decomposition around `aten._int_mm` where
torch.compile traced through a swapped module) quantizes each row of the activations at run
time and multiplies int8 by int8 summed in int32, step for step as the op's decomposition:
the same bits as PyTorch's.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import torch

import graphopt.quantized_linear as quantized_linear  # noqa: F401 - registers graphopt's ops
from graphopt.backends.xla.rules.common import _cast, rule
from graphopt.backends.xla.rules.nn import _matmul
from graphopt.passes.base import named_args as args

aten = torch.ops.aten
ops = torch.ops.graphopt


def _static_group_size(node, cfg):
    if not isinstance(args(node)["group_size"], int):
        return "symbolic int4 group size"
    return None


def _untile_int8(w: Any) -> Any:
    """The [N, K] view of an int8 weight in either layout (`quantized_linear.untile_int8`)."""
    if w.ndim == 2:
        return w
    groups, chunks, rows, channels = w.shape
    return w.transpose(0, 2, 1, 3).reshape(groups * rows, chunks * channels)


def _unpack_int4(packed: Any) -> Any:
    """uint8 [N, K/2] -> the 4-bit values [N, K] (`quantized_linear.unpack_int4`: in each block
    of 32 channels, byte j holds channel j in its low nibble and 16 + j in its high one)."""
    n, half = packed.shape
    block = quantized_linear.INT4_BLOCK // 2
    blocks = packed.reshape(n, half // block, block)
    return jnp.stack([blocks & 15, blocks >> 4], axis=2).reshape(n, half * 2)


def _linear(ctx, node, weight: Any) -> Any:
    """x @ weight.T + bias with a float32 weight, as the reference: the weight cast to x's
    dtype; a half-type product summed in float32 and rounded once, after the bias."""
    a = args(node)
    x = ctx[a["x"]]
    out = _matmul(x, weight.astype(x.dtype).T, wide=True)
    if a["bias"] is not None:
        out = out + _cast(ctx[a["bias"]], out.dtype)
    return out.astype(ctx.dtype(node))


@rule(ops.linear_int8_weight.default)
def linear_int8_weight(ctx, node):
    """x @ (q * scale[:, None]).T + bias, q int8 [N, K] or tiled [N/4, K/64, 4, 64]."""
    a = args(node)
    q = _untile_int8(ctx[a["weight"]]).astype(jnp.float32)
    return _linear(ctx, node, q * ctx[a["scale"]].astype(jnp.float32)[:, None])


@rule(ops.linear_int4_weight.default, check=_static_group_size)
def linear_int4_weight(ctx, node):
    """x @ ((q - zero) * scale).T + bias, per group of `group_size` input channels."""
    a = args(node)
    q = _unpack_int4(ctx[a["weight"]]).astype(jnp.float32)
    n, k = q.shape
    group = a["group_size"]
    grouped = q.reshape(n, k // group, group)
    zero = ctx[a["zero"]].astype(jnp.float32)[..., None]
    scale = ctx[a["scale"]].astype(jnp.float32)[..., None]
    return _linear(ctx, node, ((grouped - zero) * scale).reshape(n, k))


@rule(ops.linear_int8_dynamic.default)
def linear_int8_dynamic(ctx, node):
    """Each row of x (times act_mul) quantized to int8 by its absmax / 127; int8 @ int8.T in
    int32, times the row scale and the channel scale, plus the bias (as the decomposition in
    `quantized_linear`)."""
    a = args(node)
    x = ctx[a["x"]]
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if a["act_mul"] is not None:
        x2 = x2 * ctx[a["act_mul"]].astype(jnp.float32)
    row_scale = jnp.maximum(jnp.max(jnp.abs(x2), axis=1, keepdims=True) / 127, 1e-12)
    q = jnp.clip(jnp.round(x2 / row_scale), -127, 127).astype(jnp.int8)
    acc = jnp.matmul(q, ctx[a["weight"]].T, preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * (row_scale * ctx[a["scale"]].astype(jnp.float32))
    if a["bias"] is not None:
        y = y + ctx[a["bias"]].astype(jnp.float32)
    return y.reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype)


@rule(aten._int_mm.default)
def int_mm(ctx, node):
    """int8 [M, K] @ int8 [K, N] summed in int32 (wrapping, as torch's)."""
    return jnp.matmul(ctx[node.args[0]], ctx[node.args[1]], preferred_element_type=jnp.int32)
