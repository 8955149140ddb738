"""ATen -> Relax lowering rules. `TVM` is the TVM backend's capability list.

Each rule is `fn(ctx, node) -> relax expression` (see `lower.LoweringContext` for `ctx`); a rule
with a `check` is offered a node only when the check returns None. An op with no rule here runs
in PyTorch. Families come from factories (`_unary`, `_binary`, `_compare`, `_reduce`, ...).

Shapes are read from the node's traced output (`ctx.shape(node)`), never recomputed, so
symbolic sizes flow through view/expand/full without special cases.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx
import tvm
from tvm import relax

from graphopt.backends.registry import Check, OpRegistry
from graphopt.passes.base import named_args as args

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


# --------------------------------------------------------------------------------------------
# elementwise


def _unary(op: Callable[[relax.Expr], relax.Expr]):
    """x -> op(x), the input cast to the output dtype first (torch.exp(int) is float)."""

    def lower(ctx, node):
        return ctx.emit(op(_operand(ctx, node.args[0], ctx.dtype(node))))

    return lower


UNARY = {
    aten.abs.default: R.abs,
    aten.neg.default: R.negative,
    aten.exp.default: R.exp,
    aten.log.default: R.log,
    aten.sqrt.default: R.sqrt,
    aten.rsqrt.default: R.rsqrt,
    aten.sigmoid.default: R.sigmoid,
    aten.tanh.default: R.tanh,
    aten.erf.default: R.erf,
    aten.sin.default: R.sin,
    aten.cos.default: R.cos,
    aten.sign.default: R.sign,
    aten.relu.default: R.nn.relu,
    aten.silu.default: R.nn.silu,
    # x + 1 loses log1p's precision for |x| < 1e-7, an absolute error below 1e-7.
    aten.log1p.default: lambda x: R.log(R.add(x, relax.const(1, _dtype_of(x)))),
    aten.reciprocal.default: lambda x: R.divide(relax.const(1, _dtype_of(x)), x),
}
for _target, _op in UNARY.items():
    rule(_target)(_unary(_op))


def _rounding(op):
    """floor/ceil/round/trunc: identity on integers (torch returns them unchanged)."""

    def lower(ctx, node):
        x = ctx[node.args[0]]
        return ctx.emit(op(x)) if _is_float(_dtype_of(x)) else x

    return lower


# TVM's round is round-half-to-even, like torch.round (checked in the tests).
for _target, _op in {
    aten.floor.default: R.floor,
    aten.ceil.default: R.ceil,
    aten.round.default: R.round,
    aten.trunc.default: R.trunc,
}.items():
    rule(_target)(_rounding(_op))


@rule(aten.gelu.default)
def gelu(ctx, node):
    a = args(node)
    op = R.nn.gelu_tanh if a["approximate"] == "tanh" else R.nn.gelu
    return ctx.emit(op(ctx[a["input"]]))


def _clamp(ctx, x: relax.Expr, low: Any, high: Any) -> relax.Expr:
    dtype = _dtype_of(x)
    if low is not None:
        x = ctx.emit(R.maximum(x, ctx.const(low, dtype)))
    if high is not None:
        x = ctx.emit(R.minimum(x, ctx.const(high, dtype)))
    return x


@rule(aten.clamp.default, check=_static_scalars)
def clamp(ctx, node):
    a = args(node)
    return _clamp(ctx, _operand(ctx, a["input"], ctx.dtype(node)), a["min"], a["max"])


@rule(aten.hardtanh.default, check=_static_scalars)
def hardtanh(ctx, node):
    a = args(node)
    return _clamp(ctx, ctx[a["input"]], a["min_val"], a["max_val"])


def _hardsigmoid(ctx, x: relax.Expr) -> relax.Expr:
    """relu6(x + 3) / 6."""
    dtype = _dtype_of(x)
    shifted = ctx.emit(R.add(x, relax.const(3.0, dtype)))
    return ctx.emit(R.divide(_clamp(ctx, shifted, 0.0, 6.0), relax.const(6.0, dtype)))


@rule(aten.hardsigmoid.default)
def hardsigmoid(ctx, node):
    return _hardsigmoid(ctx, ctx[node.args[0]])


@rule(aten.hardswish.default)
def hardswish(ctx, node):
    x = ctx[node.args[0]]
    return ctx.emit(R.multiply(x, _hardsigmoid(ctx, x)))


@rule(aten.leaky_relu.default, check=_static_scalars)
def leaky_relu(ctx, node):
    a = args(node)
    return ctx.emit(R.nn.leakyrelu(ctx[a["input"]], float(a["negative_slope"])))


@rule(aten.elu.default, check=_static_scalars)
def elu(ctx, node):
    """scale * (x if x > 0 else alpha * (exp(x * input_scale) - 1))."""
    a = args(node)
    x = ctx[a["input"]]
    dtype = _dtype_of(x)

    def c(v):
        return relax.const(float(v), dtype)

    neg = R.multiply(R.subtract(R.exp(R.multiply(x, c(a["input_scale"]))), c(1)), c(a["alpha"]))
    out = ctx.emit(R.where(R.greater(x, c(0)), x, neg))
    return ctx.emit(R.multiply(out, c(a["scale"]))) if a["scale"] != 1 else out


@rule(aten.logical_not.default)
def logical_not(ctx, node):
    return ctx.emit(R.logical_not(_cast(ctx, ctx[node.args[0]], "bool")))


@rule(aten.bitwise_not.default)
def bitwise_not(ctx, node):
    x = ctx[node.args[0]]
    return ctx.emit(R.logical_not(x) if _dtype_of(x) == "bool" else R.bitwise_not(x))


def _binary(op: Callable[[relax.Expr, relax.Expr], relax.Expr]):
    """op(input, alpha * other) computed in the output dtype (torch's type promotion result)."""

    def lower(ctx, node):
        a = args(node)
        out_dtype = ctx.dtype(node)
        dtype = "int8" if out_dtype == "bool" else out_dtype  # TVM's arithmetic takes no bool
        lhs, rhs = _operand(ctx, a["input"], dtype), _operand(ctx, a["other"], dtype)
        if a.get("alpha", 1) != 1:
            rhs = ctx.emit(R.multiply(rhs, ctx.const(a["alpha"], dtype)))
        return _cast(ctx, ctx.emit(op(lhs, rhs)), out_dtype)

    return lower


BINARY = {
    (aten.add.Tensor, aten.add.Scalar): R.add,
    (aten.sub.Tensor, aten.sub.Scalar): R.subtract,
    (aten.mul.Tensor, aten.mul.Scalar): R.multiply,
    (aten.div.Tensor, aten.div.Scalar): R.divide,
    (aten.maximum.default,): R.maximum,
    (aten.minimum.default,): R.minimum,
}
for _targets, _op in BINARY.items():
    rule(*_targets, check=_static_scalars)(_binary(_op))


def _logical(op):
    """logical_and/or/xor: both sides as bool (`!= 0`), bool result."""

    def lower(ctx, node):
        a = args(node)
        return ctx.emit(op(_operand(ctx, a["input"], "bool"), _operand(ctx, a["other"], "bool")))

    return lower


def _bitwise(bool_op, int_op):
    """On bool tensors `&`, `|`, `^` are the logical ops; on integers the bitwise ones."""

    def lower(ctx, node):
        return (_logical(bool_op) if ctx.dtype(node) == "bool" else _binary(int_op))(ctx, node)

    return lower


for _targets, (_bool_op, _int_op) in {
    (aten.bitwise_and.Tensor, aten.bitwise_and.Scalar): (R.logical_and, R.bitwise_and),
    (aten.bitwise_or.Tensor, aten.bitwise_or.Scalar): (R.logical_or, R.bitwise_or),
    (aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar): (R.logical_xor, R.bitwise_xor),
}.items():
    rule(*_targets, check=_static_scalars)(_bitwise(_bool_op, _int_op))


for _target, _op in {
    aten.logical_and.default: R.logical_and,
    aten.logical_or.default: R.logical_or,
    aten.logical_xor.default: R.logical_xor,
}.items():
    rule(_target)(_logical(_op))


def _compare(op):
    """A comparison in the dtype torch compares in (result_type of both sides); bool result."""

    def lower(ctx, node):
        a = args(node)
        dtype = ctx.dtype(torch.result_type(ctx.val(a["input"]), ctx.val(a["other"])))
        dtype = "int8" if dtype == "bool" else dtype  # TVM miscompiles bool comparisons
        return ctx.emit(op(_operand(ctx, a["input"], dtype), _operand(ctx, a["other"], dtype)))

    return lower


for _name, _op in {
    "eq": R.equal,
    "ne": R.not_equal,
    "lt": R.less,
    "le": R.less_equal,
    "gt": R.greater,
    "ge": R.greater_equal,
}.items():
    _packet = getattr(aten, _name)
    rule(_packet.Tensor, _packet.Scalar, check=_static_scalars)(_compare(_op))


def _pow_check(node, cfg):
    a = args(node)
    if node.meta["val"].dtype.is_floating_point:
        return _static_scalars(node, cfg)
    if node.target is aten.pow.Tensor_Scalar and a["exponent"] == 2:
        return None
    return "integer pow other than x ** 2 (TVM computes pow in floating point)"


@rule(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar, check=_pow_check)
def pow_(ctx, node):
    a = args(node)
    dtype = ctx.dtype(node)
    base = _operand(ctx, a["input"], dtype)
    if a["exponent"] == 2:  # exact, and the common case (variance, squared error)
        return ctx.emit(R.multiply(base, base))
    return ctx.emit(R.power(base, _operand(ctx, a["exponent"], dtype)))


def _div_mode_check(node, cfg):
    mode = args(node)["rounding_mode"]
    if mode == "trunc" and not node.meta["val"].dtype.is_floating_point:
        return "integer division with rounding_mode='trunc' (TVM has floor division only)"
    return _static_scalars(node, cfg)


def _floor_divide_float(ctx, a: relax.Expr, b: relax.Expr) -> relax.Expr:
    """torch's float floor division (ATen's div_floor_floating), not floor(a / b):
    1.0 // 0.1 is 9 in torch and Python, floor(1.0 / 0.1) is 10."""
    dtype = _dtype_of(a)
    zero, one, half = (relax.const(v, dtype) for v in (0.0, 1.0, 0.5))
    quotient = ctx.emit(R.divide(a, b))
    mod = ctx.emit(R.mod(a, b))  # C fmod on floats
    div = ctx.emit(R.divide(R.subtract(a, mod), b))
    wrong_sign = R.logical_and(
        R.not_equal(mod, zero), R.logical_xor(R.less(b, zero), R.less(mod, zero))
    )
    div = ctx.emit(R.where(wrong_sign, R.subtract(div, one), div))
    floor = ctx.emit(R.floor(div))
    floor = ctx.emit(R.where(R.greater(R.subtract(div, floor), half), R.add(floor, one), floor))
    signed_zero = R.multiply(quotient, zero)  # copysign(0, a / b)
    floor = ctx.emit(R.where(R.equal(div, zero), signed_zero, floor))
    return ctx.emit(R.where(R.equal(b, zero), quotient, floor))  # x / 0: IEEE result


@rule(aten.div.Tensor_mode, aten.div.Scalar_mode, check=_div_mode_check)
def div_mode(ctx, node):
    a = args(node)
    dtype = ctx.dtype(node)
    x, y = _operand(ctx, a["input"], dtype), _operand(ctx, a["other"], dtype)
    if a["rounding_mode"] == "floor":
        if _is_float(dtype):
            return _floor_divide_float(ctx, x, y)
        return ctx.emit(R.floor_divide(x, y))  # integer floordiv: exact, Python's rounding
    quotient = ctx.emit(R.divide(x, y))
    return ctx.emit(R.trunc(quotient)) if a["rounding_mode"] == "trunc" else quotient


@rule(aten.where.self)
def where(ctx, node):
    a = args(node)
    dtype = ctx.dtype(node)
    condition = _operand(ctx, a["condition"], "bool")
    return ctx.emit(
        R.where(condition, _operand(ctx, a["input"], dtype), _operand(ctx, a["other"], dtype))
    )


# --------------------------------------------------------------------------------------------
# reductions


def _axes(dim: Any, ndim: int) -> list[int] | None:
    """Reduced axes; None (all) for dim=None or dim=[] (torch reduces everything then)."""
    if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
        return None
    dims = dim if isinstance(dim, list | tuple) else [dim]
    return sorted(_axis(d, ndim) for d in dims)


def _reduce(op, *, via_int8_for_bool: bool = False):
    """op(x, axes, keepdims), x cast to the output dtype first (sum of int32 is int64)."""

    def lower(ctx, node):
        a = args(node)
        x = ctx[a["input"]]
        ndim = ctx.val(a["input"]).dim()
        axes = _axes(a.get("dim"), ndim)
        keepdim = a.get("keepdim", False)
        dtype = ctx.dtype(node)
        if ndim == 0:  # a reduction of a 0-d tensor is the value itself (TVM rejects it)
            return _cast(ctx, x, dtype)
        if via_int8_for_bool and dtype == "bool":  # TVM's max/min take no bool
            out = ctx.emit(op(_cast(ctx, x, "int8"), axes, keepdim))
            return _cast(ctx, out, "bool")
        return ctx.emit(op(_cast(ctx, x, dtype), axes, keepdim))

    return lower


rule(aten.sum.dim_IntList, aten.sum.default)(_reduce(R.sum))
rule(aten.mean.dim, aten.mean.default)(_reduce(R.mean))


def _not_0d(node, cfg):
    """TVM's max/min/argmax/take reject 0-d tensors ("Cannot reduce a 0 dim Tensor")."""
    return "0-d input" if node.args[0].meta["val"].dim() == 0 else None


rule(aten.amax.default)(_reduce(R.max, via_int8_for_bool=True))
rule(aten.amin.default)(_reduce(R.min, via_int8_for_bool=True))


@rule(aten.any.dim, aten.any.dims, aten.any.default)
def any_(ctx, node):
    """any(x) = max(x != 0) over the axes, computed in int8."""
    a = args(node)
    x = _cast(ctx, _cast(ctx, ctx[a["input"]], "bool"), "int8")
    axes = _axes(a.get("dim"), ctx.val(a["input"]).dim())
    return _cast(ctx, ctx.emit(R.max(x, axes, a.get("keepdim", False))), "bool")


def _static_reduced_dims(node, cfg):
    a = args(node)
    shape = a["input"].meta["val"].shape
    axes = _axes(a["dim"], len(shape)) or range(len(shape))
    if any(isinstance(shape[i], torch.SymInt) for i in axes):
        return "variance over a symbolic dim"
    return None


@rule(aten.var.correction, check=_static_reduced_dims)
def var(ctx, node):
    """TVM's variance is the population variance: scale by n / (n - correction)."""
    a = args(node)
    shape = ctx.shape(a["input"])
    axes = _axes(a["dim"], len(shape))
    n = math.prod(shape[i] for i in (axes if axes is not None else range(len(shape))))
    correction = 1 if a["correction"] is None else a["correction"]
    out = ctx.emit(R.variance(ctx[a["input"]], axes, a["keepdim"]))
    if correction == 0:
        return out
    scale = n / (n - correction) if n > correction else math.inf
    return ctx.emit(R.multiply(out, ctx.const(scale, _dtype_of(out))))


def _arg_reduce(op):
    def lower(ctx, node):
        a = args(node)
        dim = a["dim"]
        axis = None if dim is None else _axis(dim, ctx.val(a["input"]).dim())
        return ctx.emit(op(ctx[a["input"]], axis, a["keepdim"]))

    return lower


def _no_bool_input(node, cfg):
    """TVM's argmax/argmin/max/min take no bool or 0-d tensors."""
    return "bool input" if node.args[0].meta["val"].dtype == torch.bool else _not_0d(node, cfg)


rule(aten.argmax.default, check=_no_bool_input)(_arg_reduce(R.argmax))
rule(aten.argmin.default, check=_no_bool_input)(_arg_reduce(R.argmin))


def _value_and_index(value_op, index_op):
    """max.dim / min.dim: (values, indices) along one dim."""

    def lower(ctx, node):
        a = args(node)
        x = ctx[a["input"]]
        axis = _axis(a["dim"], ctx.val(a["input"]).dim())
        return (
            ctx.emit(value_op(x, [axis], a["keepdim"])),
            ctx.emit(index_op(x, axis, a["keepdim"])),
        )

    return lower


rule(aten.max.dim, check=_no_bool_input)(_value_and_index(R.max, R.argmax))
rule(aten.min.dim, check=_no_bool_input)(_value_and_index(R.min, R.argmin))


@rule(aten.cumsum.default)
def cumsum(ctx, node):
    a = args(node)
    axis = _axis(a["dim"], ctx.val(a["input"]).dim())
    return ctx.emit(R.cumsum(ctx[a["input"]], axis, dtype=ctx.dtype(node)))


def _same_dtype_softmax(node, cfg):
    return "half_to_float softmax (CUDA-only fp16 -> fp32)" if node.args[2] else None


@rule(aten._softmax.default, aten._log_softmax.default, check=_same_dtype_softmax)
def softmax(ctx, node):
    a = args(node)
    op = R.nn.softmax if node.target is aten._softmax.default else R.nn.log_softmax
    return ctx.emit(op(ctx[a["input"]], _axis(a["dim"], ctx.val(a["input"]).dim())))


# --------------------------------------------------------------------------------------------
# int8: quantized_decomposed's quantize/dequantize ops (the QDQ form of PT2E and graphopt's
# quantize pass), with PyTorch's numerics to the bit, and integer conv/matmul kernels


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


# --------------------------------------------------------------------------------------------
# linear algebra, convolution, normalization, pooling


@rule(aten.mm.default, aten.bmm.default)
def matmul(ctx, node):
    """mm of a dequantized activation by a dequantized weight runs in integers (see int8)."""
    if node.target is aten.mm.default:
        product = _int8_matmul(ctx, node.args[0], node.args[1])
        if product is not None:
            return product
    return ctx.emit(R.matmul(ctx[node.args[0]], ctx[node.args[1]]))


@rule(aten.addmm.default, check=_static_scalars)
def addmm(ctx, node):
    """beta * input + alpha * (mat1 @ mat2); an int8 mat1 @ mat2 runs in integers."""
    a = args(node)
    product = _int8_matmul(ctx, a["mat1"], a["mat2"])
    if product is None:
        product = ctx.emit(R.matmul(ctx[a["mat1"]], ctx[a["mat2"]]))
    dtype = _dtype_of(product)
    if a["alpha"] != 1:
        product = ctx.emit(R.multiply(product, ctx.const(a["alpha"], dtype)))
    if a["beta"] == 0:
        return product
    bias = ctx[a["input"]]
    if a["beta"] != 1:
        bias = ctx.emit(R.multiply(bias, ctx.const(a["beta"], dtype)))
    return ctx.emit(R.add(product, bias))


def _conv_check(node, cfg):
    a = args(node)
    if a["transposed"]:
        return "transposed convolution is not lowered to TVM"
    if a["weight"].meta["val"].dim() not in (3, 4):
        return f"{a['weight'].meta['val'].dim() - 2}-d convolution (TVM rule: 1-d and 2-d)"
    if a["input"].meta["val"].dim() != a["weight"].meta["val"].dim():
        return "unbatched convolution input"
    return None


@rule(aten.convolution.default, check=_conv_check)
def convolution(ctx, node):
    """A dequantized activation convolved with a dequantized weight runs in integers (int8)."""
    a = args(node)
    conv = R.nn.conv2d if len(ctx.shape(a["weight"])) == 4 else R.nn.conv1d
    attrs = {
        "strides": a["stride"],
        "padding": a["padding"],
        "dilation": a["dilation"],
        "groups": a["groups"],
    }
    operands = _int8_operands(ctx, a["input"], _per_channel_weight(a["weight"], 0))
    if operands is not None:
        x, weight, scale = operands
        acc = ctx.emit(conv(x, weight, **attrs, out_dtype="int32"))
        scale = ctx.emit(R.reshape(scale, [1, -1] + [1] * (len(ctx.shape(node)) - 2)))
        out = ctx.emit(R.multiply(R.astype(acc, "float32"), scale))
    else:
        out = ctx.emit(conv(ctx[a["input"]], ctx[a["weight"]], **attrs))
    if a["bias"] is None:
        return out
    ndim = len(ctx.shape(node))
    bias = ctx.emit(R.reshape(ctx[a["bias"]], [1, -1] + [1] * (ndim - 2)))
    return ctx.emit(R.add(out, bias))


def _ones_or(ctx, arg: Any, shape: list, dtype: str, fill: float) -> relax.Expr:
    """An optional affine parameter, or a constant filled with `fill` when it is None."""
    return ctx[arg] if arg is not None else R.full(shape, relax.const(fill, dtype), dtype)


@rule(aten.native_layer_norm.default, check=_first_output_only)
def layer_norm(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    dtype, ndim = _dtype_of(x), len(ctx.shape(a["input"]))
    shape = list(a["normalized_shape"])
    axes = list(range(ndim - len(shape), ndim))
    gamma = _ones_or(ctx, a["weight"], shape, dtype, 1.0)
    beta = _ones_or(ctx, a["bias"], shape, dtype, 0.0)
    return (ctx.emit(R.nn.layer_norm(x, gamma, beta, axes, epsilon=a["eps"])), None, None)


@rule(aten.native_group_norm.default, check=_first_output_only)
def group_norm(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    dtype, ndim = _dtype_of(x), len(ctx.shape(a["input"]))
    channels = [ctx.dim(a["C"])]
    gamma = _ones_or(ctx, a["weight"], channels, dtype, 1.0)
    beta = _ones_or(ctx, a["bias"], channels, dtype, 0.0)
    out = R.nn.group_norm(x, gamma, beta, a["group"], 1, list(range(2, ndim)), a["eps"])
    return (ctx.emit(out), None, None)


@rule(aten._native_batch_norm_legit_no_training.default, check=_first_output_only)
def batch_norm(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    dtype = _dtype_of(x)
    channels = [ctx.shape(a["input"])[1]]
    gamma = _ones_or(ctx, a["weight"], channels, dtype, 1.0)
    beta = _ones_or(ctx, a["bias"], channels, dtype, 0.0)
    mean, var_ = ctx[a["running_mean"]], ctx[a["running_var"]]
    bn = ctx.emit(R.nn.batch_norm(x, gamma, beta, mean, var_, 1, a["eps"], training=False))
    return (ctx.emit(relax.TupleGetItem(bn, 0)), None, None)


def _pool_check(*, indices: bool):
    def check(node, cfg):
        a = args(node)
        if a["input"].meta["val"].dim() != 4:
            return "unbatched (3-d) pooling input"
        if not indices and a["divisor_override"] is not None:
            return "avg_pool2d with divisor_override"
        return _first_output_only(node, cfg) if indices else None

    return check


def _pair(v: Any, default: Any = None) -> list[int]:
    v = default if (v is None or v == []) else v
    v = list(v) if isinstance(v, list | tuple) else [v]
    return v * 2 if len(v) == 1 else v


@rule(aten.max_pool2d_with_indices.default, check=_pool_check(indices=True))
def max_pool2d(ctx, node):
    a = args(node)
    kernel = _pair(a["kernel_size"])
    out = R.nn.max_pool2d(
        ctx[a["input"]],
        pool_size=kernel,
        strides=_pair(a["stride"], kernel),
        padding=_pair(a["padding"]),
        dilation=_pair(a["dilation"]),
        ceil_mode=a["ceil_mode"],
    )
    return (ctx.emit(out), None)


@rule(aten.avg_pool2d.default, check=_pool_check(indices=False))
def avg_pool2d(ctx, node):
    a = args(node)
    kernel = _pair(a["kernel_size"])
    out = R.nn.avg_pool2d(
        ctx[a["input"]],
        pool_size=kernel,
        strides=_pair(a["stride"], kernel),
        padding=_pair(a["padding"]),
        ceil_mode=a["ceil_mode"],
        count_include_pad=a["count_include_pad"],
    )
    return ctx.emit(out)


def _batched_4d(node, cfg):
    return None if node.args[0].meta["val"].dim() == 4 else "unbatched (3-d) pooling input"


@rule(aten._adaptive_avg_pool2d.default, check=_batched_4d)
def adaptive_avg_pool2d(ctx, node):
    a = args(node)
    return ctx.emit(R.nn.adaptive_avg_pool2d(ctx[a["input"]], _pair(a["output_size"])))


def _pad_check(node, cfg):
    if any(p < 0 for p in args(node)["pad"]):
        return "negative padding (cropping)"
    return _static_scalars(node, cfg)


@rule(aten.constant_pad_nd.default, check=_pad_check)
def constant_pad_nd(ctx, node):
    """torch lists (before, after) pairs from the last dim backwards; TVM from the first."""
    a = args(node)
    ndim = len(ctx.shape(node))
    pad = list(a["pad"])
    pairs = [pad[i : i + 2] for i in range(0, len(pad), 2)][::-1]
    width = [0] * (2 * (ndim - len(pairs))) + [p for pair in pairs for p in pair]
    return ctx.emit(R.nn.pad(ctx[a["input"]], width, "constant", float(a["value"])))


@rule(aten.embedding.default)
def embedding(ctx, node):
    a = args(node)
    return ctx.emit(R.take(ctx[a["weight"]], ctx[a["indices"]], axis=0))


@rule(aten.index_select.default, check=_not_0d)
def index_select(ctx, node):
    a = args(node)
    axis = _axis(a["dim"], ctx.val(a["input"]).dim())
    return ctx.emit(R.take(ctx[a["input"]], ctx[a["index"]], axis=axis))


def _gather_check(node, cfg):
    return "sparse_grad gather" if args(node)["sparse_grad"] else None


@rule(aten.gather.default, check=_gather_check)
def gather(ctx, node):
    a = args(node)
    axis = _axis(a["dim"], ctx.val(a["input"]).dim())
    return ctx.emit(R.gather_elements(ctx[a["input"]], ctx[a["index"]], axis=axis))


# --------------------------------------------------------------------------------------------
# shapes, copies, constructors


def _reshape_to_output(ctx, node):
    """view / reshape / squeeze / unsqueeze / flatten: the traced output shape says it all."""
    return ctx.emit(R.reshape(ctx[node.args[0]], ctx.shape(node)))


rule(
    aten.view.default,
    aten._unsafe_view.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
)(_reshape_to_output)


@rule(aten.clone.default, aten.alias.default)
def identity(ctx, node):
    """Values are immutable in Relax: a copy is the value itself."""
    return ctx[node.args[0]]


@TVM.rule(aten._assert_tensor_metadata.default)  # returns nothing, so it has no meta["val"]
def assert_tensor_metadata(ctx, node):
    """Checked when torch traced the graph; nothing to compute."""
    return None


@rule(aten.permute.default)
def permute(ctx, node):
    a = args(node)
    ndim = len(a["dims"])
    return ctx.emit(R.permute_dims(ctx[a["input"]], [_axis(d, ndim) for d in a["dims"]]))


@rule(aten.t.default)
def t(ctx, node):
    x = ctx[node.args[0]]
    return ctx.emit(R.permute_dims(x, [1, 0])) if len(ctx.shape(node)) == 2 else x


@rule(aten.transpose.int)
def transpose(ctx, node):
    a = args(node)
    ndim = len(ctx.shape(node))
    axes = list(range(ndim))
    i, j = _axis(a["dim0"], ndim), _axis(a["dim1"], ndim)
    axes[i], axes[j] = axes[j], axes[i]
    return ctx.emit(R.permute_dims(ctx[a["input"]], axes))


@rule(aten.expand.default)
def expand(ctx, node):
    return ctx.emit(R.broadcast_to(ctx[node.args[0]], ctx.shape(node)))


@rule(aten.flip.default)
def flip(ctx, node):
    a = args(node)
    x, ndim = ctx[a["input"]], len(ctx.shape(node))
    for dim in a["dims"]:
        x = ctx.emit(R.flip(x, _axis(dim, ndim)))
    return x


@rule(aten.repeat.default)
def repeat(ctx, node):
    a = args(node)
    return ctx.emit(R.tile(ctx[a["input"]], list(a["repeats"])))


def _cat_check(node, cfg):
    out_ndim = node.meta["val"].dim()
    for t in args(node)["tensors"]:
        if t.meta["val"].dim() != out_ndim:  # torch.cat skips 1-d empty tensors
            return "cat of tensors of different ranks (legacy empty-tensor skipping)"
    return None


@rule(aten.cat.default, check=_cat_check)
def cat(ctx, node):
    a = args(node)
    dtype = ctx.dtype(node)
    tensors = [_operand(ctx, t, dtype) for t in a["tensors"]]
    return ctx.emit(R.concat(tensors, axis=_axis(a["dim"], len(ctx.shape(node)))))


def _slice(ctx, x: relax.Expr, axis: int, begin: Any, length: Any, step: int) -> relax.Expr:
    """`length` elements of `x` along `axis` from `begin` with `step`."""
    end = begin + (length - 1) * step + 1
    return ctx.emit(R.strided_slice(x, axes=[axis], begin=[begin], end=[end], strides=[step]))


def _static_slice_args(node, cfg):
    a = args(node)
    for key in ("start", "step", "index"):
        if isinstance(a.get(key), torch.SymInt | torch.fx.Node):
            return f"symbolic slice {key}"
    return None


@rule(aten.slice.Tensor, check=_static_slice_args)
def slice_(ctx, node):
    """begin from `start` (normalized), length from the traced output: no clamping to redo."""
    a = args(node)
    ndim = len(ctx.shape(node))
    axis = _axis(a["dim"], ndim)
    size = ctx.shape(a["input"])[axis]
    length = ctx.shape(node)[axis]
    if isinstance(length, int) and length == 0:
        return ctx.emit(R.strided_slice(ctx[a["input"]], [axis], [0], [0]))
    start = a["start"] or 0
    if start < 0:
        start = size + start
    if isinstance(size, int):
        start = min(max(start, 0), size)
    return _slice(ctx, ctx[a["input"]], axis, start, length, a["step"])


@rule(aten.select.int, check=_static_slice_args)
def select(ctx, node):
    a = args(node)
    ndim = ctx.val(a["input"]).dim()
    axis = _axis(a["dim"], ndim)
    index = a["index"]
    if index < 0:
        index = ctx.shape(a["input"])[axis] + index
    part = _slice(ctx, ctx[a["input"]], axis, index, 1, 1)
    return ctx.emit(R.reshape(part, ctx.shape(node)))


@rule(aten.split.Tensor, aten.split_with_sizes.default)
def split(ctx, node):
    """One strided slice per piece, sizes from the traced outputs."""
    a = args(node)
    x = ctx[a["input"]]
    axis = _axis(a["dim"], ctx.val(a["input"]).dim())
    pieces, begin = [], 0
    for piece in ctx.val(node):
        length = ctx.dim(piece.shape[axis])
        pieces.append(_slice(ctx, x, axis, begin, length, 1))
        begin = begin + length
    return tuple(pieces)


@rule(operator.getitem, check=lambda node, cfg: TVM.unsupported_reason(node.args[0], cfg))
def getitem(ctx, node):
    """Output i of a multi-output op (a Python tuple of relax values, or a relax tuple)."""
    source, index = ctx[node.args[0]], node.args[1]
    if isinstance(source, list | tuple):
        if source[index] is None and node.users:
            raise ValueError(f"output {index} of {node.args[0].name} is not lowered")
        return source[index]
    return ctx.emit(relax.TupleGetItem(source, index))


def _integer_size(node, cfg):
    value = node.meta.get("val")
    return None if isinstance(value, int | torch.SymInt) else "not an integer size expression"


@rule(
    aten.sym_size.int,
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.mod,
    check=_integer_size,
)
def sym_size(ctx, node):
    """Sizes and size arithmetic (s0 * 4) as tirx expressions, read from the traced value."""
    return ctx.dim(ctx.val(node))


def _to_copy_check(node, cfg):
    a = args(node)
    source = a["input"].meta["val"]
    if a["device"] is not None and torch.device(a["device"]).type != source.device.type:
        return f"copy from {source.device} to {a['device']}"
    if a["layout"] not in (None, torch.strided):
        return f"layout {a['layout']}"
    return None


@rule(aten._to_copy.default, check=_to_copy_check)
def to_copy(ctx, node):
    return _cast(ctx, ctx[node.args[0]], ctx.dtype(node))


@rule(aten.full.default, aten.full_like.default, check=_static_scalars)
def full(ctx, node):
    dtype = ctx.dtype(node)
    return ctx.emit(R.full(ctx.shape(node), ctx.const(args(node)["fill_value"], dtype), dtype))


@rule(aten.scalar_tensor.default, check=_static_scalars)
def scalar_tensor(ctx, node):
    return ctx.const(args(node)["s"], ctx.dtype(node))


def _arange_check(node, cfg):
    a = args(node)
    for key in ("start", "step"):
        if isinstance(a.get(key), torch.fx.Node | torch.SymInt | torch.SymFloat):
            return f"symbolic arange {key}"
    if isinstance(a["end"], torch.SymFloat):
        return "symbolic float arange end"
    return None


@rule(aten.arange.default, aten.arange.start, aten.arange.start_step, check=_arange_check)
def arange(ctx, node):
    """start, step static; end may be a size expression (arange(2 * batch))."""
    a = args(node)
    start, step = a.get("start", 0), a.get("step", 1)
    return ctx.emit(R.arange(start, ctx[a["end"]], step, dtype=ctx.dtype(node)))
