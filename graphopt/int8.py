"""graphopt's one int8 semantics: how numbers are quantized, multiplied and requantized.

Every int8 path is defined by these functions: the quantize pass chooses parameters with them,
the tests use them as the bit-exact reference, and integer-only backends (the FPGA C++) must
reproduce them exactly.

* Activations: asymmetric per tensor, 8 bits. `q = clamp(round(x / scale) + zero_point, 0, 255)`.
  They are stored as uint8 [0, 255] in graphs because oneDNN's int8 kernels take u8 activations.
  The signed view used by int8 x int8 hardware is `q - 128` with `zero_point - 128`: the same
  real numbers, so both encodings give identical results.
* Weights: symmetric per output channel, int8 in [-127, 127] (zero point 0),
  `scale[c] = max|w[c]| / 127`.
* Bias: int32 at scale `x_scale * w_scale[c]`.
* Products: 8 x 8 bit -> int32 accumulate `acc = sum((qx - zx) * qw) + qbias`.
* Requantize: `q_out = saturate(round(acc * M) + z_out)` where `M = x_scale * w_scale / out_scale`
  is a fixed-point multiplier `m0 * 2**-(31 + shift)` (m0 an int32 in [2**30, 2**31)).
* Rounding is round-half-to-even everywhere (as torch.round and quantize_per_tensor).
* Saturation, never wrap-around: every narrowing clamps to the target range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

ACT_QMIN, ACT_QMAX, ACT_DTYPE = 0, 255, torch.uint8
WEIGHT_QMIN, WEIGHT_QMAX, WEIGHT_DTYPE = -127, 127, torch.int8
# The range the graph's dequantize_per_channel nodes declare (as PT2E does); the values the
# quantize pass writes stay in [-127, 127].
WEIGHT_DECLARED_QMIN = -128
_TINY = float(torch.finfo(torch.float32).tiny)


def activation_qparams(lo: float, hi: float, qmax: int = ACT_QMAX) -> tuple[float, int]:
    """(scale, zero_point) of an asymmetric uint8 range [0, qmax] covering [lo, hi] and 0.

    qmax=127 is the reduced (7-bit) range for CPUs without VNNI (see `host_activation_qmax`).
    The scale is rounded to float32 so every consumer uses the very same number.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"calibration saw a non-finite activation range [{lo}, {hi}]")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (qmax - ACT_QMIN)
    scale = float(torch.tensor(scale if scale > _TINY else 1.0, dtype=torch.float32))
    zero_point = int(min(max(ACT_QMIN - round(lo / scale), ACT_QMIN), qmax))
    return scale, zero_point


def host_activation_qmax() -> int:
    """255, or 127 on x86 CPUs without VNNI.

    Without VNNI (avx512_vnni, avx_vnni or AMX), oneDNN's u8 x s8 kernels multiply with
    vpmaddubsw, which adds two u8*s8 products into a *saturating* int16: 255*127*2 overflows.
    Measured on an AVX2-only EPYC: a single int8 conv through inductor was 10-15% off its own
    quantized graph (torchao's PT2E X86InductorQuantizer alike). With activations in [0, 127]
    no pair can saturate (127*127*2 < 32767). This is fbgemm's `reduce_range`.
    """
    caps = torch.cpu.get_capabilities()
    if caps.get("architecture", "x86_64") not in ("x86_64", "x86", "i386", "AMD64"):
        return ACT_QMAX
    vnni = any(caps.get(k, False) for k in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return ACT_QMAX if vnni else 127


def weight_qparams(weight: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Per-channel symmetric float32 scales of `weight` along `axis` (never zero)."""
    dims = [d for d in range(weight.dim()) if d != axis]
    amax = weight.detach().abs().amax(dim=dims) if dims else weight.detach().abs()
    return (amax.float() / WEIGHT_QMAX).clamp_min(_TINY)


def quantize_weight(weight: torch.Tensor, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 per-channel scales) for a float weight, channels along `axis`."""
    scales = weight_qparams(weight, axis)
    shape = [1] * weight.dim()
    shape[axis] = -1
    q = torch.round(weight.detach().float() / scales.view(shape))
    return q.clamp(WEIGHT_QMIN, WEIGHT_QMAX).to(WEIGHT_DTYPE), scales


def quantize(x: torch.Tensor, scale: float, zero_point: int, qmax: int = ACT_QMAX) -> torch.Tensor:
    """float -> uint8 activation in [0, qmax] (round half to even, saturate)."""
    q = torch.round(x.float() * (1.0 / scale)) + zero_point
    return q.clamp(ACT_QMIN, qmax).to(ACT_DTYPE)


def dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (q.to(torch.int32) - zero_point).float() * scale


def fake_quantize(
    x: torch.Tensor, scale: float, zero_point: int, qmax: int = ACT_QMAX
) -> torch.Tensor:
    """x through quantize and dequantize: the float value an int8 activation stands for."""
    return dequantize(quantize(x, scale, zero_point, qmax), scale, zero_point)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(m0, shift) with real ~= m0 * 2**-(31 + shift), m0 in [2**30, 2**31).

    `shift` may be negative (real >= 1). Raises for non-positive or non-finite values.
    """
    if not (real > 0 and math.isfinite(real)):
        raise ValueError(f"requantize multiplier must be positive and finite, got {real}")
    mantissa, exponent = math.frexp(real)  # real = mantissa * 2**exponent, mantissa in [0.5, 1)
    m0 = round(mantissa * (1 << 31))
    if m0 == 1 << 31:  # rounding carried into the next power of two
        m0 //= 2
        exponent += 1
    return m0, -exponent


def rounding_shift(value: torch.Tensor, shift: int | torch.Tensor) -> torch.Tensor:
    """round(value / 2**shift), half to even, for int64 `value` and shift >= 1 (exact)."""
    value = value.to(torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64)
    floor = torch.bitwise_right_shift(value, shift)  # arithmetic: floor division
    remainder = value - torch.bitwise_left_shift(floor, shift)
    half = torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)
    up = (remainder > half) | ((remainder == half) & (floor % 2 == 1))
    return floor + up.to(torch.int64)


def requantize(
    acc: torch.Tensor,
    m0: torch.Tensor | int,
    shift: torch.Tensor | int,
    zero_point: int,
    *,
    qmin: int = ACT_QMIN,
    qmax: int = ACT_QMAX,
) -> torch.Tensor:
    """int32 accumulators -> 8-bit outputs: saturate(round(acc * m0 / 2**(31+shift)) + zp).

    `m0`/`shift` are scalars or per-channel tensors broadcastable against `acc`.
    The product is formed in 64 bits, as a DSP or a 64-bit multiply does; nothing wraps.
    """
    acc = acc.to(torch.int64)
    if acc.abs().max().item() >= 1 << 31 if acc.numel() else False:
        raise OverflowError("int32 accumulator overflow: the layer needs wider accumulation")
    product = acc * torch.as_tensor(m0, dtype=torch.int64)
    total = torch.as_tensor(shift, dtype=torch.int64) + 31
    if bool((total < 1).any()):
        raise ValueError("requantize multiplier >= 2**30 is not supported")
    out = rounding_shift(product, total) + zero_point
    return out.clamp(qmin, qmax).to(torch.uint8 if qmin >= 0 else torch.int8)


def quantize_bias(bias: torch.Tensor, x_scale: float, w_scales: torch.Tensor) -> torch.Tensor:
    """float bias -> int32 at scale x_scale * w_scale[c] (round half to even, saturate)."""
    q = torch.round(bias.double() / (x_scale * w_scales.double()))
    return q.clamp(-(2**31), 2**31 - 1).to(torch.int32)


def integer_linear(
    qx: torch.Tensor, zx: int, qw: torch.Tensor, qbias: torch.Tensor | None
) -> torch.Tensor:
    """int32 accumulators of a linear layer: (qx - zx) @ qw.T + qbias, exactly."""
    acc = (qx.to(torch.int64) - zx) @ qw.to(torch.int64).t()
    if qbias is not None:
        acc = acc + qbias.to(torch.int64)
    return _to_int32(acc)


def integer_conv2d(
    qx: torch.Tensor,
    zx: int,
    qw: torch.Tensor,
    qbias: torch.Tensor | None,
    stride: tuple[int, int] | list[int] = (1, 1),
    padding: tuple[int, int] | list[int] = (0, 0),
    dilation: tuple[int, int] | list[int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """int32 accumulators of a 2-D convolution with zero padding in the real domain.

    Padding contributes (zx - zx) = 0, as a real-valued zero input does. Computed in float64,
    which is exact for every sum of 8 x 8 bit products below 2**53.
    """
    x = qx.to(torch.float64) - zx
    acc = torch.nn.functional.conv2d(
        x, qw.to(torch.float64), None, stride, padding, dilation, groups
    )
    acc = acc.round().to(torch.int64)
    if qbias is not None:
        acc = acc + qbias.to(torch.int64).view(1, -1, 1, 1)
    return _to_int32(acc)


def _to_int32(acc: torch.Tensor) -> torch.Tensor:
    if acc.numel() and acc.abs().max().item() >= 1 << 31:
        raise OverflowError("int32 accumulator overflow: the layer needs wider accumulation")
    return acc.to(torch.int32)


def output_multipliers(
    x_scale: float, w_scales: torch.Tensor, out_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel fixed-point (m0, shift) tensors for x_scale * w_scale[c] / out_scale."""
    pairs = [quantize_multiplier(x_scale * float(s) / out_scale) for s in w_scales.double()]
    m0 = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    shift = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    return m0, shift


def rescale_multipliers(ratios: Sequence[float]) -> tuple[list[int], int]:
    """Integer multipliers sharing one shift: ratio[i] ~= m[i] / 2**shift, every m[i] < 2**30.

    Used where several 8-bit inputs meet at one output scale (a residual add: ratio[i] =
    in_scale[i] / out_scale): each input is scaled exactly in 64 bits and the sum is rounded
    once, `out = saturate(round(sum((q[i] - z[i]) * m[i]) / 2**shift) + z_out)`.
    """
    if not ratios or not all(r > 0 and math.isfinite(r) for r in ratios):
        raise ValueError(f"rescale ratios must be positive and finite, got {list(ratios)}")
    exponent = max(math.frexp(r)[1] for r in ratios)  # every ratio < 2**exponent
    shift = 30 - exponent
    if shift < 1:
        raise ValueError(f"rescale ratio {max(ratios)} >= 2**29 is not supported")
    return [round(r * 2.0**shift) for r in ratios], shift


def rescale_add(
    terms: Sequence[tuple[torch.Tensor, int]],
    multipliers: Sequence[int],
    shift: int,
    zero_point: int,
    *,
    qmin: int = ACT_QMIN,
    qmax: int = ACT_QMAX,
) -> torch.Tensor:
    """saturate(round(sum((q - z) * m) / 2**shift) + zero_point) over (q, z) `terms`.

    The 8-bit add of quantized tensors at different scales (`rescale_multipliers`); with one
    term it requantizes a tensor to another scale.
    """
    total = torch.zeros((), dtype=torch.int64)
    for (q, z), m in zip(terms, multipliers, strict=True):
        total = total + (q.to(torch.int64) - z) * m
    out = rounding_shift(total, shift) + zero_point
    return out.clamp(qmin, qmax).to(torch.uint8 if qmin >= 0 else torch.int8)
