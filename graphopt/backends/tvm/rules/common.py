"""The TVM registry, the dtypes TVM lowers, and what every rule family shares (checks,
casts, axes)."""

from __future__ import annotations

from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx
from tvm import relax

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
R = relax.op

TVM = OpRegistry("tvm")

# torch dtypes TVM lowers (complex, float8 and quantized dtypes stay in PyTorch).
TVM_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}


# --------------------------------------------------------------------------------------------
# helpers


_dtypes_supported = dtypes_in(TVM_DTYPES, "TVM")


def rule(*targets: Any, check: Check | None = None):
    """`TVM.rule`, with the checks every rule shares (traced values, dtypes) before its own."""
    return TVM.rule(*targets, check=all_of(traced, _dtypes_supported, check))


_first_output_only = first_output_only("TVM")


def _dtype_of(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def _not_equal(a: relax.Expr, b: relax.Expr) -> relax.Expr:
    """a != b with IEEE semantics: true where either side is NaN. TVM's LLVM codegen compiles
    not_equal on floats to an ordered comparison (`fcmp one`: false for NaN), and its
    simplifier turns not(a == b) back into a != b in a fused kernel, so floats also test
    isnan (`fcmp uno`) on both sides."""
    ne = R.not_equal(a, b)
    if not _is_float(_dtype_of(a)):
        return ne
    return R.logical_or(ne, R.logical_or(R.isnan(a), R.isnan(b)))


def _cast(ctx, expr: relax.Expr, dtype: str) -> relax.Expr:
    """`expr` as `dtype`; to bool means `!= 0` (a plain float->bool cast truncates 0.5 to 0)."""
    if _dtype_of(expr) == dtype:
        return expr
    if dtype == "bool":
        return ctx.emit(_not_equal(expr, relax.const(0, _dtype_of(expr))))  # NaN is True
    return ctx.emit(R.astype(expr, dtype))


def _operand(ctx, arg: Any, dtype: str) -> relax.Expr:
    """A tensor argument cast to `dtype`, or a Python scalar as a `dtype` constant."""
    if isinstance(arg, torch.fx.Node):
        return _cast(ctx, ctx[arg], dtype)
    return ctx.const(arg, dtype)


def _axis(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))
