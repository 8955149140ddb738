"""The XLA registry, the dtypes it lowers, and what every rule family shares (checks, casts,
axes)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx

from graphopt.backends.registry import (
    Check,
    OpRegistry,
    all_of,
    dtypes_in,
    first_output_only,
    traced,
)

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

XLA = OpRegistry("xla")

# torch dtypes XLA lowers (complex, float8 and quantized dtypes stay in PyTorch). 64-bit types
# need jax's x64 mode, which graphopt turns on around its own tracing and calls only
# (`jax.enable_x64`, a context: the user's other JAX code keeps its setting).
XLA_DTYPES: dict[torch.dtype, Any] = {
    torch.float32: jnp.float32,
    torch.float16: jnp.float16,
    torch.bfloat16: jnp.bfloat16,
    torch.float64: jnp.float64,
    torch.int64: jnp.int64,
    torch.int32: jnp.int32,
    torch.int16: jnp.int16,
    torch.int8: jnp.int8,
    torch.uint8: jnp.uint8,
    torch.bool: jnp.bool_,
}


_dtypes_supported = dtypes_in(XLA_DTYPES, "XLA")
_first_output_only = first_output_only("XLA")


def rule(*targets: Any, check: Check | None = None):
    """`XLA.rule`, with the checks every rule shares (traced values, dtypes) before its own."""
    return XLA.rule(*targets, check=all_of(traced, _dtypes_supported, check))


def _axis(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _is_float(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _cast(x: Any, dtype: Any) -> Any:
    """`x` as `dtype`; to bool means `!= 0` (as torch's)."""
    x = jnp.asarray(x)
    if x.dtype == dtype:
        return x
    if dtype == jnp.bool_:
        return x != 0
    return x.astype(dtype)


def _scalar(value: Any, dtype: Any) -> Any:
    """A Python number as a `dtype` array, as torch converts a scalar operand: an int wraps
    around in an integer dtype (uint8 x * -1 multiplies by 255, int8 x * 200 by -56)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if jnp.issubdtype(dtype, jnp.integer):
            return jnp.asarray(np.asarray(value, np.int64).astype(dtype))
    return jnp.asarray(value, dtype=dtype)


def _operand(ctx, arg: Any, dtype: Any) -> Any:
    """A tensor argument cast to `dtype`, or a Python scalar as a `dtype` array."""
    if isinstance(arg, torch.fx.Node):
        return _cast(ctx[arg], dtype)
    return _scalar(ctx[arg], dtype)
