"""Elementwise rules: unary, binary, special functions, comparisons, logical and bitwise ops,
clamps and activations, where."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import torch
import torch.fx
from jax import lax

from graphopt.backends.registry import static_scalars
from graphopt.backends.xla.rules.common import _cast, _is_float, _operand, _scalar, rule
from graphopt.passes.base import named_args as args

aten = torch.ops.aten


def _in_float32(op: Callable[..., Any]) -> Callable[..., Any]:
    """op computed in float32 for float16/bfloat16 operands, rounded once: torch's CPU kernels
    compute half types in float32 (their opmath type), and XLA's half-precision exp2, sigmoid,
    i0, asin, ... are off from that by more than the half types' tolerance (float16
    sigmoid(-11.5) is 0 in XLA, 1.0e-5 in torch)."""

    def wrapped(x: Any, *rest: Any) -> Any:
        dtype = jnp.result_type(x, *rest)
        if not (_is_float(dtype) and jnp.finfo(dtype).bits < 32):
            return op(x, *rest)
        wide = [jnp.asarray(v).astype(jnp.float32) for v in (x, *rest)]
        return op(*wide).astype(dtype)

    return wrapped


def _unary(op: Callable[[Any], Any]):
    """x -> op(x), the input cast to the output dtype first (torch.exp(int) is float); half
    types in float32 (`_in_float32`)."""

    def lower(ctx, node):
        return _in_float32(op)(_operand(ctx, node.args[0], ctx.dtype(node)))

    return lower


UNARY = {
    aten.abs.default: jnp.abs,
    aten.neg.default: jnp.negative,
    aten.exp.default: jnp.exp,
    aten.exp2.default: jnp.exp2,
    aten.expm1.default: jnp.expm1,
    aten.log.default: jnp.log,
    aten.log2.default: jnp.log2,
    aten.log10.default: jnp.log10,
    aten.log1p.default: jnp.log1p,
    aten.sqrt.default: jnp.sqrt,
    aten.rsqrt.default: lax.rsqrt,
    aten.sigmoid.default: jax.nn.sigmoid,
    aten.tanh.default: jnp.tanh,
    aten.erf.default: lax.erf,
    aten.erfinv.default: lax.erf_inv,
    aten.sin.default: jnp.sin,
    aten.cos.default: jnp.cos,
    aten.tan.default: jnp.tan,
    aten.asin.default: jnp.arcsin,
    aten.acos.default: jnp.arccos,
    aten.atan.default: jnp.arctan,
    aten.sinh.default: jnp.sinh,
    aten.cosh.default: jnp.cosh,
    aten.asinh.default: jnp.arcsinh,
    aten.acosh.default: jnp.arccosh,
    aten.atanh.default: jnp.arctanh,
    aten.sign.default: lambda x: x if x.dtype == jnp.bool_ else jnp.sign(x),  # bool: itself
    aten.relu.default: jax.nn.relu,
    aten.silu.default: jax.nn.silu,
    aten.reciprocal.default: jnp.reciprocal,
}
for _target, _op in UNARY.items():
    rule(_target)(_unary(_op))


def _digamma(x: Any) -> Any:
    """digamma with torch's poles at zero: -inf at +0, +inf at -0 (lax gives nan)."""
    return jnp.where(x == 0, -jnp.copysign(jnp.asarray(jnp.inf, x.dtype), x), lax.digamma(x))


# Special functions, checked against torch's over [-20, 20] and the edges (0, -0, inf, nan);
# erfcx (0 for x > 9 in float32), zeta and igamma (nan at inf) and polygamma n >= 1 (wrong
# for negative x) are not jax's equal, so they stay in PyTorch.
SPECIAL = {
    aten.lgamma.default: lax.lgamma,
    aten.digamma.default: _digamma,
    aten.erfc.default: lax.erfc,
    aten.i0.default: jax.scipy.special.i0,
    aten.special_i0e.default: lax.bessel_i0e,
    aten.special_i1.default: jax.scipy.special.i1,
    aten.special_i1e.default: lax.bessel_i1e,
    aten.special_ndtri.default: jax.scipy.special.ndtri,
}
for _target, _op in SPECIAL.items():
    rule(_target)(_unary(_op))


def _polygamma_check(node, cfg):
    return None if args(node)["n"] == 0 else "polygamma of order n >= 1 (jax's is wrong for x < 0)"


@rule(aten.polygamma.default, check=_polygamma_check)
def polygamma(ctx, node):
    """polygamma(0, x) is digamma."""
    return _digamma(_operand(ctx, args(node)["input"], ctx.dtype(node)))


@rule(aten.signbit.default)
def signbit(ctx, node):
    """Of the input as it is (the bool output is no dtype to compute in); -0.0 is negative."""
    return jnp.signbit(ctx[node.args[0]])


@rule(aten.isnan.default)
def isnan(ctx, node):
    return jnp.isnan(ctx[node.args[0]])


@rule(aten.isinf.default)
def isinf(ctx, node):
    return jnp.isinf(ctx[node.args[0]])


def _rounding(op):
    """floor/ceil/round/trunc: identity on integers (torch returns them unchanged)."""

    def lower(ctx, node):
        x = ctx[node.args[0]]
        return op(x) if _is_float(x.dtype) else x

    return lower


# jnp.round rounds half to even, like torch.round.
for _target, _op in {
    aten.floor.default: jnp.floor,
    aten.ceil.default: jnp.ceil,
    aten.round.default: jnp.round,
    aten.trunc.default: jnp.trunc,
}.items():
    rule(_target)(_rounding(_op))


@rule(aten.round.decimals)
def round_decimals(ctx, node):
    """torch's: round(x * 10^d) / 10^d, for d < 0 round(x / 10^-d) * 10^-d, in float32 at
    least (its opmath type) and rounded to the dtype once."""
    a = args(node)
    x = ctx[a["input"]]
    if not _is_float(x.dtype):
        return x
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    decimals = a["decimals"]
    scale = jnp.asarray(10.0 ** abs(decimals), wide.dtype)
    if decimals < 0:
        out = jnp.round(wide / scale) * scale
    else:
        out = jnp.round(wide * scale) / scale
    return out.astype(x.dtype)


@rule(aten.frexp.Tensor)
def frexp(ctx, node):
    """(mantissa, exponent): x = mantissa * 2^exponent, |mantissa| in [0.5, 1); int32
    exponents."""
    mantissa, exponent = jnp.frexp(ctx[node.args[0]])
    return mantissa, exponent.astype(jnp.int32)


@rule(aten.gelu.default)
def gelu(ctx, node):
    a = args(node)
    gelu = functools.partial(jax.nn.gelu, approximate=a["approximate"] == "tanh")
    return _in_float32(gelu)(ctx[a["input"]])


def _clamp(x: Any, low: Any, high: Any) -> Any:
    if low is not None:
        x = jnp.maximum(x, low if isinstance(low, jax.Array) else _scalar(low, x.dtype))
    if high is not None:
        x = jnp.minimum(x, high if isinstance(high, jax.Array) else _scalar(high, x.dtype))
    return x


@rule(aten.clamp.default, check=static_scalars)
def clamp(ctx, node):
    a = args(node)
    return _clamp(_operand(ctx, a["input"], ctx.dtype(node)), a["min"], a["max"])


@rule(aten.clamp.Tensor)
def clamp_tensor(ctx, node):
    a = args(node)
    dtype = ctx.dtype(node)
    low = None if a["min"] is None else _operand(ctx, a["min"], dtype)
    high = None if a["max"] is None else _operand(ctx, a["max"], dtype)
    return _clamp(_operand(ctx, a["input"], dtype), low, high)


@rule(aten.hardtanh.default, check=static_scalars)
def hardtanh(ctx, node):
    a = args(node)
    return _clamp(ctx[a["input"]], a["min_val"], a["max_val"])


def _hardsigmoid(x: Any) -> Any:
    """relu6(x + 3) / 6."""
    return _clamp(x + jnp.asarray(3.0, x.dtype), 0.0, 6.0) / jnp.asarray(6.0, x.dtype)


@rule(aten.hardsigmoid.default)
def hardsigmoid(ctx, node):
    return _in_float32(_hardsigmoid)(ctx[node.args[0]])


@rule(aten.hardswish.default)
def hardswish(ctx, node):
    return _in_float32(lambda x: x * _hardsigmoid(x))(ctx[node.args[0]])


@rule(aten.leaky_relu.default, check=static_scalars)
def leaky_relu(ctx, node):
    a = args(node)

    def leaky(x):  # half types in float32: the slope is not rounded to them, as torch's
        return jnp.where(x > 0, x, x * jnp.asarray(a["negative_slope"], x.dtype))

    return _in_float32(leaky)(ctx[a["input"]])


@rule(aten.elu.default, check=static_scalars)
def elu(ctx, node):
    """scale * (x if x > 0 else alpha * (exp(x * input_scale) - 1))."""
    a = args(node)

    def elu(x):
        def c(v):
            return jnp.asarray(v, x.dtype)

        out = jnp.where(x > 0, x, jnp.expm1(x * c(a["input_scale"])) * c(a["alpha"]))
        return out * c(a["scale"]) if a["scale"] != 1 else out

    return _in_float32(elu)(ctx[a["input"]])


@rule(aten.logical_not.default)
def logical_not(ctx, node):
    return jnp.logical_not(_cast(ctx[node.args[0]], jnp.bool_))


@rule(aten.bitwise_not.default)
def bitwise_not(ctx, node):
    x = ctx[node.args[0]]
    return jnp.logical_not(x) if x.dtype == jnp.bool_ else jnp.bitwise_not(x)


def _is_half(dtype: Any) -> bool:
    return _is_float(dtype) and jnp.finfo(dtype).bits < 32


def _one_element(ctx, arg: Any) -> bool:
    """A Python number, or a tensor of one element (its size static)."""
    if not isinstance(arg, torch.fx.Node):
        return True
    value = ctx.val(arg)
    if not isinstance(value, torch.Tensor):  # a symbolic number
        return True
    return all(isinstance(d, int) and d == 1 for d in value.shape)


def _half_operands(ctx, node, dtype: Any, scalar_in_float32: bool) -> tuple[Any, Any]:
    """(input, other) as float32 for an op whose result is a half type, as torch's kernels
    compute it: each tensor in the result dtype first; a scalar `other` (a Python number or a
    one-element tensor) of mul and div read in float32 instead (torch's reduced-float fast
    path reads its original value: bfloat16 x * 3.3 multiplies by 3.3, not 3.296875)."""
    a = args(node)
    lhs = _operand(ctx, a["input"], dtype).astype(jnp.float32)
    if scalar_in_float32 and _one_element(ctx, a["other"]):
        return lhs, _operand(ctx, a["other"], jnp.float32)
    return lhs, _operand(ctx, a["other"], dtype).astype(jnp.float32)


def _binary(op: Callable[[Any, Any], Any], *, scalar_in_float32: bool = False):
    """op(input, alpha * other) computed in the output dtype (torch's type promotion result);
    a half type in float32, rounded once (alpha in the half type first), as torch's kernels;
    scalar_in_float32: see `_half_operands`."""

    def lower(ctx, node):
        a = args(node)
        dtype = ctx.dtype(node)
        alpha = a.get("alpha", 1)
        if _is_half(dtype):
            lhs, rhs = _half_operands(ctx, node, dtype, scalar_in_float32)
            if alpha != 1:
                rhs = rhs * _scalar(alpha, dtype).astype(jnp.float32)
            return op(lhs, rhs).astype(dtype)
        lhs, rhs = _operand(ctx, a["input"], dtype), _operand(ctx, a["other"], dtype)
        if alpha != 1:
            rhs = rhs * _scalar(alpha, dtype)
        return _cast(op(lhs, rhs), dtype)

    return lower


def _add(x, y):
    return jnp.logical_or(x, y) if x.dtype == jnp.bool_ else x + y


def _mul(x, y):
    return jnp.logical_and(x, y) if x.dtype == jnp.bool_ else x * y


def _divide(x: Any, y: Any) -> Any:
    """x / y, IEEE division as torch's. XLA's simplifier turns a division by a broadcast
    (a scalar divisor) into a multiplication by its reciprocal, one ulp off the quotient, and
    floor or trunc of it one off the integer (float32 trunc(x / 0.37), for some x): such a
    divisor is broadcast in full behind an optimization barrier."""
    if _is_float(jnp.result_type(x, y)):
        shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(y))
        if jnp.shape(y) != shape:
            y = lax.optimization_barrier(jnp.broadcast_to(y, shape))
    return jnp.true_divide(x, y)


BINARY = {
    (aten.add.Tensor, aten.add.Scalar): _add,
    (aten.sub.Tensor, aten.sub.Scalar): jnp.subtract,
    (aten.mul.Tensor, aten.mul.Scalar): _mul,
    (aten.div.Tensor, aten.div.Scalar): _divide,
    (aten.maximum.default,): jnp.maximum,
    (aten.minimum.default,): jnp.minimum,
    (aten.atan2.default,): _in_float32(jnp.arctan2),
    (aten.fmod.Tensor, aten.fmod.Scalar): jnp.fmod,
    (aten.remainder.Tensor, aten.remainder.Scalar): jnp.remainder,
    (aten.copysign.Tensor, aten.copysign.Scalar): jnp.copysign,
    (aten.fmax.default,): jnp.fmax,  # NaN only where both are
    (aten.fmin.default,): jnp.fmin,
    (aten.hypot.default,): _in_float32(jnp.hypot),
    (aten.nextafter.default,): jnp.nextafter,
    (aten.ldexp.Tensor,): lambda x, e: x * _in_float32(jnp.exp2)(e),  # torch's: x * 2 ** e
}
for _targets, _op in BINARY.items():
    _opmath = _targets[0] in (aten.mul.Tensor, aten.div.Tensor)
    rule(*_targets, check=static_scalars)(_binary(_op, scalar_in_float32=_opmath))


def _logical(op):
    """logical_and/or/xor: both sides as bool (`!= 0`), bool result."""

    def lower(ctx, node):
        a = args(node)
        return op(_operand(ctx, a["input"], jnp.bool_), _operand(ctx, a["other"], jnp.bool_))

    return lower


for _target, _op in {
    aten.logical_and.default: jnp.logical_and,
    aten.logical_or.default: jnp.logical_or,
    aten.logical_xor.default: jnp.logical_xor,
}.items():
    rule(_target)(_logical(_op))

# On bool tensors jnp's bitwise ops are the logical ones.
for _targets, _op in {
    (aten.bitwise_and.Tensor, aten.bitwise_and.Scalar): jnp.bitwise_and,
    (aten.bitwise_or.Tensor, aten.bitwise_or.Scalar): jnp.bitwise_or,
    (aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar): jnp.bitwise_xor,
}.items():
    rule(*_targets, check=static_scalars)(_binary(_op))


def _compare(op):
    """A comparison in the dtype torch compares in (result_type of both sides); bool result."""

    def lower(ctx, node):
        a = args(node)
        dtype = ctx.dtype(torch.result_type(ctx.val(a["input"]), ctx.val(a["other"])))
        return op(_operand(ctx, a["input"], dtype), _operand(ctx, a["other"], dtype))

    return lower


for _name, _op in {
    "eq": jnp.equal,
    "ne": jnp.not_equal,
    "lt": jnp.less,
    "le": jnp.less_equal,
    "gt": jnp.greater,
    "ge": jnp.greater_equal,
}.items():
    _packet = getattr(aten, _name)
    rule(_packet.Tensor, _packet.Scalar, check=static_scalars)(_compare(_op))


def _pow_check(node, cfg):
    a = args(node)
    if not node.meta["val"].dtype.is_floating_point:
        exponent = a["exponent"]
        if isinstance(exponent, torch.fx.Node) or exponent < 0:
            return "integer pow with a tensor or negative exponent"
    return static_scalars(node, cfg)


@rule(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar, check=_pow_check)
def pow_(ctx, node):
    a = args(node)
    dtype = ctx.dtype(node)
    base = _operand(ctx, a["input"], dtype)
    exponent = a["exponent"]
    if exponent == 2:  # exact, and the common case (variance, squared error)
        return base * base
    if not isinstance(exponent, torch.fx.Node) and float(exponent).is_integer():
        if not _is_float(dtype) or abs(exponent) <= 4:
            return _in_float32(lambda b: lax.integer_pow(b, int(exponent)))(base)
    return _in_float32(jnp.power)(base, _operand(ctx, exponent, dtype))


def _floor_divide_float(a: Any, b: Any) -> Any:
    """torch's float floor division (ATen's div_floor_floating), not floor(a / b):
    1.0 // 0.1 is 9 in torch and Python, floor(1.0 / 0.1) is 10."""
    zero, one, half = (jnp.asarray(v, a.dtype) for v in (0.0, 1.0, 0.5))
    a, b = jnp.broadcast_arrays(a, b)
    quotient = _divide(a, b)
    mod = jnp.fmod(a, b)
    div = _divide(a - mod, b)
    wrong_sign = (mod != zero) & ((b < zero) ^ (mod < zero))
    div = jnp.where(wrong_sign, div - one, div)
    floor = jnp.floor(div)
    floor = jnp.where(div - floor > half, floor + one, floor)
    floor = jnp.where(div == zero, quotient * zero, floor)  # copysign(0, a / b)
    return jnp.where(b == zero, quotient, floor)  # x / 0: IEEE result


@rule(aten.div.Tensor_mode, aten.div.Scalar_mode, check=static_scalars)
def div_mode(ctx, node):
    a = args(node)
    dtype = ctx.dtype(node)
    mode = a["rounding_mode"]
    if _is_half(dtype) and _one_element(ctx, a["other"]):  # torch's reduced-float fast path
        x, y = _half_operands(ctx, node, dtype, scalar_in_float32=True)
        floor = _floor_divide_float(x, y) if mode == "floor" else jnp.trunc(_divide(x, y))
        return (floor if mode is not None else _divide(x, y)).astype(dtype)
    x, y = _operand(ctx, a["input"], dtype), _operand(ctx, a["other"], dtype)
    if mode == "floor":
        return _floor_divide_float(x, y) if _is_float(dtype) else jnp.floor_divide(x, y)
    if mode == "trunc":
        if _is_float(dtype):
            return jnp.trunc(_divide(x, y))
        return lax.div(*jnp.broadcast_arrays(x, y))  # C's division; lax does not broadcast
    return _divide(x, y)


@rule(aten.where.self)
def where(ctx, node):
    a = args(node)
    dtype = ctx.dtype(node)
    condition = _operand(ctx, a["condition"], jnp.bool_)
    return jnp.where(condition, _operand(ctx, a["input"], dtype), _operand(ctx, a["other"], dtype))
