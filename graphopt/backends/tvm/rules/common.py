"""The TVM registry, the dtypes TVM lowers, and what every rule family shares (checks,
casts, axes)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx
from tvm import relax

from graphopt.backends.registry import Check, OpRegistry

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


def _tensor_values(node: torch.fx.Node) -> list[torch.Tensor]:
    values = [node.meta.get("val")] + [n.meta.get("val") for n in node.all_input_nodes]
    flat = []
    for v in values:
        flat.extend(v if isinstance(v, list | tuple) else [v])
    return [v for v in flat if isinstance(v, torch.Tensor)]


def _dtypes_supported(node: torch.fx.Node, cfg: Any) -> str | None:
    for value in _tensor_values(node):
        if value.dtype not in TVM_DTYPES:
            return f"dtype {value.dtype} is not lowered to TVM"
    return None


def _all(*checks: Check | None) -> Check:
    def check(node, cfg):
        for c in checks:
            reason = c(node, cfg) if c is not None else None
            if reason is not None:
                return reason
        return None

    return check


def _traced(node: torch.fx.Node, cfg: Any) -> str | None:
    missing = [n.name for n in [node, *node.all_input_nodes] if "val" not in n.meta]
    return f"no meta['val'] on {missing} (run FakeTensorProp)" if missing else None


def rule(*targets: Any, check: Check | None = None):
    """`TVM.rule`, with the checks every rule shares (traced values, dtypes) before its own."""
    return TVM.rule(*targets, check=_all(_traced, _dtypes_supported, check))


def _static_scalars(node: torch.fx.Node, cfg: Any) -> str | None:
    """Elementwise ops take Python numbers, not symbolic ones (SymInt/SymFloat)."""
    for a in [*node.args, *node.kwargs.values()]:
        value = a.meta.get("val") if isinstance(a, torch.fx.Node) else a
        if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
            return "symbolic scalar operand"
    return None


def _first_output_only(node: torch.fx.Node, cfg: Any) -> str | None:
    """For multi-output ops whose rule computes output 0 only (inference graphs use no more)."""
    for user in node.users:
        if user.target is not operator.getitem or (user.args[1] != 0 and user.users):
            return "uses more than output 0 (the TVM rule computes output 0 only)"
    return None


def _dtype_of(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def _cast(ctx, expr: relax.Expr, dtype: str) -> relax.Expr:
    """`expr` as `dtype`; to bool means `!= 0` (a plain float->bool cast truncates 0.5 to 0)."""
    if _dtype_of(expr) == dtype:
        return expr
    if dtype == "bool":
        return ctx.emit(R.not_equal(expr, relax.const(0, _dtype_of(expr))))
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
