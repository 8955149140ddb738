"""graphopt.int8: the one integer semantics, checked against exact rational arithmetic."""

from fractions import Fraction

import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed

from graphopt import int8

qd = torch.ops.quantized_decomposed


def _round_half_even(x: Fraction) -> int:
    return round(x)  # Python rounds Fractions half to even


@pytest.mark.parametrize("real", [1e-6, 0.0123, 0.25, 0.5, 0.999999, 1.0, 3.7])
def test_quantize_multiplier_represents_the_real_multiplier(real):
    m0, shift = int8.quantize_multiplier(real)
    assert (1 << 30) <= m0 < (1 << 31)
    approx = m0 / 2 ** (31 + shift)
    assert abs(approx - real) <= real * 2**-30


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_quantize_multiplier_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="positive and finite"):
        int8.quantize_multiplier(bad)


def test_rounding_shift_is_round_half_to_even():
    values = torch.arange(-40, 41, dtype=torch.int64)
    for shift in (1, 2, 3):
        got = int8.rounding_shift(values, shift).tolist()
        want = [_round_half_even(Fraction(int(v), 2**shift)) for v in values]
        assert got == want


def test_requantize_matches_exact_arithmetic_and_saturates():
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-(2**20), 2**20, (2000,), generator=g, dtype=torch.int64)
    acc[:4] = torch.tensor([0, 2**31 - 1, -(2**31) + 1, 12345])
    for real in (0.000123, 0.0071, 0.31):
        m0, shift = int8.quantize_multiplier(real)
        got = int8.requantize(acc, m0, shift, zero_point=17, qmin=0, qmax=255)
        for a, q in zip(acc.tolist(), got.tolist()):
            exact = _round_half_even(Fraction(a * m0, 2 ** (31 + shift))) + 17
            assert q == min(max(exact, 0), 255)  # saturated, never wrapped
    assert got.dtype == torch.uint8


def test_requantize_refuses_accumulators_beyond_int32():
    with pytest.raises(OverflowError, match="int32"):
        int8.requantize(torch.tensor([2**31]), *int8.quantize_multiplier(0.5), 0)


def test_activation_qparams_cover_range_and_zero():
    scale, zp = int8.activation_qparams(-1.0, 3.0)
    assert zp == round(1.0 / scale) and 0 <= zp <= 255
    assert int8.dequantize(int8.quantize(torch.tensor([0.0]), scale, zp), scale, zp).item() == 0
    # a range entirely above zero still represents zero exactly
    scale, zp = int8.activation_qparams(2.0, 5.0)
    assert zp == 0 and scale == pytest.approx(5.0 / 255, rel=1e-6)
    scale, zp = int8.activation_qparams(0.0, 0.0)  # a dead activation: a valid scale anyway
    assert scale == 1.0 and zp == 0
    scale, zp = int8.activation_qparams(-1.0, 1.0, qmax=127)
    assert zp == 64 and scale == pytest.approx(2.0 / 127, rel=1e-6)
    with pytest.raises(ValueError, match="non-finite"):
        int8.activation_qparams(float("-inf"), 1.0)


def test_quantize_agrees_with_torch_quantize_per_tensor():
    x = torch.linspace(-3, 3, 1001)
    x = torch.cat([x, torch.tensor([0.5, 1.5, 2.5, -0.5]) * 0.02])  # exact .5 boundaries
    for qmax in (127, 255):
        scale, zp = int8.activation_qparams(-2.0, 2.0, qmax)
        ours = int8.quantize(x, scale, zp, qmax)
        torch_q = qd.quantize_per_tensor.default(x, scale, zp, 0, qmax, torch.uint8)
        assert torch.equal(ours, torch_q)
        assert ours.max().item() == qmax and ours.min().item() == 0  # saturation


def test_weights_are_symmetric_per_channel():
    w = torch.randn(6, 3, 3, 3)
    w[2] = 0.0  # an all-zero channel must not divide by zero
    q, scales = int8.quantize_weight(w)
    assert q.dtype == torch.int8 and scales.shape == (6,)
    assert q.abs().max().item() == 127 and q.min().item() >= -127
    assert torch.all(q[2] == 0)
    err = (q.float() * scales.view(-1, 1, 1, 1) - w).abs()
    assert torch.all(err <= scales.view(-1, 1, 1, 1) / 2 + 1e-7)


def _quantized_layer(kind: str):
    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        x = torch.randn(8, 40, generator=g)
        w = torch.randn(12, 40, generator=g) * 0.2
    else:
        x = torch.randn(2, 4, 9, 9, generator=g)
        w = torch.randn(12, 4, 3, 3, generator=g) * 0.2
    bias = torch.randn(12, generator=g) * 0.1
    x_scale, x_zp = int8.activation_qparams(float(x.min()), float(x.max()))
    qx = int8.quantize(x, x_scale, x_zp)
    qw, w_scales = int8.quantize_weight(w)
    qbias = int8.quantize_bias(bias, x_scale, w_scales)
    if kind == "linear":
        acc = int8.integer_linear(qx, x_zp, qw, qbias)
        real = torch.nn.functional.linear(
            int8.dequantize(qx, x_scale, x_zp), qw.float() * w_scales.view(-1, 1), bias
        )
    else:
        acc = int8.integer_conv2d(qx, x_zp, qw, qbias, padding=(1, 1))
        real = torch.nn.functional.conv2d(
            int8.dequantize(qx, x_scale, x_zp),
            qw.float() * w_scales.view(-1, 1, 1, 1),
            bias,
            padding=1,
        )
    return acc, real, x_scale, w_scales


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_integer_layer_equals_the_dequantized_float_layer(kind):
    """int32 accumulate + fixed-point requantize == the QDQ float graph, within 1 LSB."""
    acc, real, x_scale, w_scales = _quantized_layer(kind)
    out_scale, out_zp = int8.activation_qparams(float(real.min()), float(real.max()))
    m0, shift = int8.output_multipliers(x_scale, w_scales, out_scale)
    shape = (1, -1) + (1,) * (acc.dim() - 2)
    integer = int8.requantize(acc, m0.view(shape), shift.view(shape), out_zp)
    simulated = int8.quantize(real, out_scale, out_zp)
    diff = (integer.int() - simulated.int()).abs()
    assert diff.max().item() <= 1  # bias rounding and float vs fixed point: one step at most
    assert (diff == 0).float().mean().item() > 0.97


def test_integer_conv_padding_is_a_real_zero():
    qx = torch.full((1, 1, 3, 3), 7, dtype=torch.uint8)  # every input equals the zero point
    qw = torch.ones(1, 1, 3, 3, dtype=torch.int8)
    acc = int8.integer_conv2d(qx, 7, qw, None, padding=(1, 1))
    assert torch.all(acc == 0)


def test_rescale_add_is_one_rounding_of_the_exact_sum():
    """(q_a - z_a) * s_a + (q_b - z_b) * s_b at output scale s: the integer multipliers share
    one shift, so the sum is rounded once; results within 1 LSB of the real-valued sum and
    saturated, never wrapped."""
    torch.manual_seed(0)
    sa, sb, so = 0.02, 0.013, 0.01  # ratios above 1: both ends saturate
    multipliers, shift = int8.rescale_multipliers([sa / so, sb / so])
    assert all(m < 2**30 for m in multipliers) and shift >= 1
    qa, qb = torch.randint(0, 256, (1000,)), torch.randint(0, 256, (1000,))
    got = int8.rescale_add([(qa, 100), (qb, 30)], multipliers, shift, 7)
    real = ((qa - 100) * sa + (qb - 30) * sb) / so + 7
    assert (got.double() - real.clamp(0, 255)).abs().max() <= 0.5 + 1e-3
    assert got.dtype == torch.uint8 and int(got.min()) == 0 and int(got.max()) == 255
    with pytest.raises(ValueError, match="positive and finite"):
        int8.rescale_multipliers([0.5, 0.0])
