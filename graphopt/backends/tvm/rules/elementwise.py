"""Elementwise rules: unary, binary, comparisons, logical and bitwise ops, clamps and
activations, where."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx
from tvm import relax

from graphopt.backends.registry import static_scalars
from graphopt.backends.tvm.rules.common import (
    _cast,
    _dtype_of,
    _is_float,
    _not_equal,
    _operand,
    rule,
)
from graphopt.passes.base import named_args as args

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
R = relax.op


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


@rule(aten.isnan.default)
def isnan(ctx, node):
    """TVM's isnan (LLVM's unordered comparison); integers are never NaN."""
    x = ctx[node.args[0]]
    if _is_float(_dtype_of(x)):
        return ctx.emit(R.isnan(x))
    return ctx.emit(R.zeros_like(x, "bool"))


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


@rule(aten.clamp.default, check=static_scalars)
def clamp(ctx, node):
    a = args(node)
    return _clamp(ctx, _operand(ctx, a["input"], ctx.dtype(node)), a["min"], a["max"])


@rule(aten.hardtanh.default, check=static_scalars)
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


@rule(aten.leaky_relu.default, check=static_scalars)
def leaky_relu(ctx, node):
    a = args(node)
    return ctx.emit(R.nn.leakyrelu(ctx[a["input"]], float(a["negative_slope"])))


@rule(aten.elu.default, check=static_scalars)
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
    rule(*_targets, check=static_scalars)(_binary(_op))


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
    rule(*_targets, check=static_scalars)(_bitwise(_bool_op, _int_op))


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
    "ne": _not_equal,
    "lt": R.less,
    "le": R.less_equal,
    "gt": R.greater,
    "ge": R.greater_equal,
}.items():
    _packet = getattr(aten, _name)
    rule(_packet.Tensor, _packet.Scalar, check=static_scalars)(_compare(_op))


def _pow_check(node, cfg):
    a = args(node)
    if node.meta["val"].dtype.is_floating_point:
        return static_scalars(node, cfg)
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
    return static_scalars(node, cfg)


def _floor_divide_float(ctx, a: relax.Expr, b: relax.Expr) -> relax.Expr:
    """torch's float floor division (ATen's div_floor_floating), not floor(a / b):
    1.0 // 0.1 is 9 in torch and Python, floor(1.0 / 0.1) is 10."""
    dtype = _dtype_of(a)
    zero, one, half = (relax.const(v, dtype) for v in (0.0, 1.0, 0.5))
    quotient = ctx.emit(R.divide(a, b))
    mod = ctx.emit(R.mod(a, b))  # C fmod on floats
    div = ctx.emit(R.divide(R.subtract(a, mod), b))
    wrong_sign = R.logical_and(
        _not_equal(mod, zero), R.logical_xor(R.less(b, zero), R.less(mod, zero))
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
