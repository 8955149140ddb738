"""int8 on TVM: quantized_decomposed's ops bit for bit, and integer conv/matmul kernels.

The reference is always the same QDQ graph run by PyTorch op by op (quantized_decomposed's
reference implementations): quantize/dequantize must agree exactly, integer kernels within
fp32 rounding (their sums are exact in int32, PyTorch's float simulation rounds each product).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import graphopt
from graphopt.backends.tvm import build_relax, compile_subgraph
from graphopt.capture import capture_export
from graphopt.compiler import new_report
from graphopt.config import Config
from graphopt.pipeline import run_graph, run_pipeline
from graphopt.testing import assert_same_outputs, relative_error
from tests.backends.tvm.conftest import LLVM, unsupported_nodes
from tests.models import Fn

qd = torch.ops.quantized_decomposed
# Integer kernels against PyTorch's float simulation of the same int8 numbers: one fp32
# multiply after an exact int32 sum, against fp32 sums of rounded products (measured ~3e-7).
KERNEL_RELATIVE_ERROR = 2e-6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tvm_and_torch(
    gm: torch.fx.GraphModule, inputs: list[Any]
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], str]:
    """(TVM outputs, PyTorch outputs of the same graph, the Relax IR) for a graph TVM takes
    whole (every node has a rule)."""
    assert unsupported_nodes(gm) == []
    ir = build_relax(gm, inputs, LLVM).script()
    got = compile_subgraph(gm, inputs, LLVM)(*inputs)
    expected = run_graph(gm, inputs)
    expected = tuple(expected) if isinstance(expected, list | tuple) else (expected,)
    return got, expected, ir


def _exported(fn, *inputs: torch.Tensor, **buffers: torch.Tensor):
    captured = capture_export(Fn(fn, **buffers).eval(), inputs)
    return captured.gm, captured.example_inputs


def _assert_equal(expected, got) -> None:
    for e, g in zip(expected, got, strict=True):
        assert e.dtype == g.dtype and e.shape == g.shape
        mismatch = (e != g).nonzero()
        assert torch.equal(e, g), f"{len(mismatch)} values differ, first at {mismatch[:5]}"


def _int32_ops(ir: str, op: str) -> int:
    return sum(1 for line in ir.splitlines() if op in line and 'out_dtype="int32"' in line)


# --------------------------------------------------------------------------------------------
# quantize / dequantize, bit for bit


def _ties(scale: float) -> torch.Tensor:
    """Inputs whose float32 product with float32(1 / scale) is exactly k + 0.5 for many k,
    their float32 neighbours, and values that saturate both ends."""
    k = torch.arange(-300, 300, dtype=torch.float32)
    at_ties = (k + 0.5) * scale
    near = torch.cat(
        [at_ties, torch.nextafter(at_ties, at_ties + 1), at_ties.nextafter(at_ties - 1)]
    )
    steps = torch.arange(-600, 600, dtype=torch.float32) * (scale / 2)  # k * 0.05 for 0.1 ...
    extremes = torch.tensor([1e6, -1e6, 3.4e38, -3.4e38, float("inf"), float("-inf"), 0.0, -0.0])
    return torch.cat([near, steps, extremes])


QUANTIZE_PARAMS = {  # scale, zero_point, quant_min, quant_max, dtype
    "u8_255": (0.1, 3, 0, 255, torch.uint8),
    "u8_127": (0.05, 64, 0, 127, torch.uint8),
    "u8_odd_scale": (0.023299481719732285, 132, 0, 255, torch.uint8),
    "s8": (0.25, -3, -128, 127, torch.int8),
    "s8_odd_scale": (0.0070380293764173985, 0, -128, 127, torch.int8),
}


@pytest.mark.parametrize("name", list(QUANTIZE_PARAMS))
def test_quantize_dequantize_per_tensor_are_exact(name):
    scale, zp, qmin, qmax, dtype = QUANTIZE_PARAMS[name]
    x = torch.cat([_ties(scale), torch.randn(4000, generator=_gen(0)) * scale * 100])

    def fn(m, x):
        q = qd.quantize_per_tensor.default(x, scale, zp, qmin, qmax, dtype)
        return q, qd.dequantize_per_tensor.default(q, scale, zp, qmin, qmax, dtype)

    gm, inputs = _exported(fn, x)
    got, expected, _ = _tvm_and_torch(gm, inputs)
    _assert_equal(expected, got)
    q = expected[0].to(torch.int64)
    assert int(q.min()) == qmin and int(q.max()) == qmax  # both ends saturate
    # the inputs really hold ties (x * (1/scale) exactly k + 0.5 in float32) of both parities
    y = x * float(torch.tensor(1.0 / scale, dtype=torch.float32))
    ties = y[(y - y.floor() == 0.5) & (y.abs() < 250)]
    assert (ties.floor() % 2 == 0).sum() > 50 and (ties.floor() % 2 == 1).sum() > 50


def test_quantize_rounds_half_to_even_not_away_from_zero():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 0.49999997])
    gm, inputs = _exported(
        lambda m, x: qd.quantize_per_tensor.default(x, 1.0, 10, 0, 255, torch.uint8), x
    )
    got, expected, _ = _tvm_and_torch(gm, inputs)
    assert got[0].tolist() == expected[0].tolist() == [8, 8, 10, 10, 12, 12, 14, 10]


def test_quantize_multiplies_by_the_float32_reciprocal_like_torch():
    """round(x / scale), round(x * float32(1 / scale)) and the exactly rounded product differ
    for inputs near ties: torch computes the second (quantized_decomposed's reference)."""
    scale = 0.023299481719732285
    x = _ties(scale)[:1800]
    inv = float(torch.tensor(1 / scale, dtype=torch.float32))
    multiplied = torch.round(x * inv)
    assert (torch.round(x / scale) != multiplied).sum() > 100  # the inputs tell them apart
    assert (torch.round(x.double() * inv).float() != multiplied).sum() > 100  # (as FMA would)
    gm, inputs = _exported(
        lambda m, x: qd.quantize_per_tensor.default(x, scale, 0, -128, 127, torch.int8), x
    )
    got, expected, _ = _tvm_and_torch(gm, inputs)
    _assert_equal(expected, got)


def test_dequantize_every_8bit_value():
    u8 = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    s8 = torch.arange(-128, 128, dtype=torch.int32).to(torch.int8)

    def fn(m, u, s):
        return (
            qd.dequantize_per_tensor.default(u, 0.023299481719732285, 132, 0, 255, torch.uint8),
            qd.dequantize_per_tensor.default(s, 0.0070380293764173985, -7, -128, 127, torch.int8),
        )

    gm, inputs = _exported(fn, u8, s8)
    got, expected, _ = _tvm_and_torch(gm, inputs)
    _assert_equal(expected, got)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_quantize_dequantize_are_exact(axis):
    x = torch.randn(6, 5, 4, generator=_gen(1)) * 3
    channels = x.shape[axis]
    scales = torch.rand(channels, generator=_gen(2)) * 0.05 + 0.01
    zero_points = torch.randint(-5, 6, (channels,), generator=_gen(3), dtype=torch.int64)
    shape = [1] * 3
    shape[axis] = -1
    k = torch.randint(-150, 150, x.shape, generator=_gen(4)).float()
    ties = (k + 0.5) * scales.view(shape)  # many land exactly on ties; |k| > 128 saturates
    x = torch.cat([x, ties], dim=(axis + 1) % 3).contiguous()

    def fn(m, x):
        q = qd.quantize_per_channel.default(x, m.s, m.z, axis, -128, 127, torch.int8)
        return (
            q,
            qd.dequantize_per_channel.default(q, m.s, m.z, axis, -128, 127, torch.int8),
            qd.dequantize_per_channel.default(q, m.s, None, axis, -128, 127, torch.int8),
        )

    gm, inputs = _exported(fn, x, s=scales, z=zero_points)
    got, expected, _ = _tvm_and_torch(gm, inputs)
    _assert_equal(expected, got)
    assert int(expected[0].min()) == -128 and int(expected[0].max()) == 127


# --------------------------------------------------------------------------------------------
# integer kernels


def _int8_weight(*shape: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight in [-127, 127], float32 per-output-channel scales) as the pass makes."""
    qw = torch.randint(-127, 128, shape, generator=_gen(seed), dtype=torch.int8)
    scales = torch.rand(shape[0], generator=_gen(seed + 1)) * 0.02 + 0.001
    return qw, scales


def _act(x: torch.Tensor, scale: float, zp: int, qmin: int, qmax: int, dtype: torch.dtype):
    q = qd.quantize_per_tensor.default(x, scale, zp, qmin, qmax, dtype)
    return qd.dequantize_per_tensor.default(q, scale, zp, qmin, qmax, dtype)


CONV_CASES = {  # conv kwargs, activation (scale, zp, qmin, qmax, dtype), weight zero points
    "3x3": ({"padding": 1}, (0.02, 128, 0, 255, torch.uint8), "zeros"),
    "strided_dilated_no_bias": (
        {"stride": 2, "dilation": 2, "padding": 2, "bias": False},
        (0.03, 100, 0, 255, torch.uint8),
        None,
    ),
    "depthwise": ({"padding": 1, "groups": 8}, (0.02, 64, 0, 127, torch.uint8), "zeros"),
    "int8_activation": ({"padding": 1}, (0.02, -5, -128, 127, torch.int8), "zeros"),
    "weight_zero_points": ({"padding": 1}, (0.02, 128, 0, 255, torch.uint8), "nonzero"),
    "conv1d": ({"padding": 1, "dims": 1}, (0.02, 128, 0, 255, torch.uint8), "zeros"),
}


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_quantized_conv_runs_in_integers(name):
    kwargs, act, zeros = CONV_CASES[name]
    kwargs = dict(kwargs)
    dims, bias = kwargs.pop("dims", 2), kwargs.pop("bias", True)
    groups = kwargs.get("groups", 1)
    spatial = (3,) * dims
    qw, scales = _int8_weight(8, 8 // groups, *spatial, seed=10)
    z = {
        "zeros": torch.zeros(8, dtype=torch.int64),
        "nonzero": torch.randint(-3, 4, (8,), generator=_gen(4), dtype=torch.int64),
        None: None,
    }[zeros]
    buffers = {"qw": qw, "s": scales, "b": torch.randn(8, generator=_gen(5))}
    if z is not None:
        buffers["z"] = z
    conv = F.conv2d if dims == 2 else F.conv1d

    def fn(m, x):
        w = qd.dequantize_per_channel.default(
            m.qw, m.s, m.z if z is not None else None, 0, -128, 127, torch.int8
        )
        return conv(_act(x, *act), w, m.b if bias else None, **kwargs)

    x = torch.randn(2, 8, *(9,) * dims, generator=_gen(6)) * 2  # saturates some values
    gm, inputs = _exported(fn, x, **buffers)
    got, expected, ir = _tvm_and_torch(gm, inputs)
    assert _int32_ops(ir, f"R.nn.conv{dims}d(") == 1, ir
    assert 'float32") = R.nn.conv' not in ir  # no float convolution left
    assert_same_outputs(expected, got)
    assert relative_error(expected[0], got[0]) < KERNEL_RELATIVE_ERROR


def _linear_case(form: str):
    """A linear layer on an int8 weight in one of the forms graphs hold it in."""
    qw, scales = _int8_weight(7, 40, seed=20)  # [out, in], channels along out
    bias = torch.randn(7, generator=_gen(21))
    act = (0.03, 120, 0, 255, torch.uint8)
    x = torch.randn(5, 40, generator=_gen(22)) * 2
    zeros = torch.zeros(7, dtype=torch.int64)

    def weight(m, axis=0, q=None):
        q = m.qw if q is None else q
        return qd.dequantize_per_channel.default(q, m.s, m.z, axis, -128, 127, torch.int8)

    buffers = {"qw": qw, "s": scales, "z": zeros, "b": bias}
    if form == "addmm_permute":  # what graphopt's quantize pass writes
        return _exported(
            lambda m, x: torch.addmm(m.b, _act(x, *act), weight(m).permute(1, 0)), x, **buffers
        )
    if form == "mm_permute":
        return _exported(
            lambda m, x: torch.mm(_act(x, *act), weight(m).permute(1, 0)), x, **buffers
        )
    if form == "mm_in_out_axis1":  # an [in, out] int8 weight, channels along axis 1
        buffers["qw"] = qw.t().contiguous()
        return _exported(lambda m, x: torch.mm(_act(x, *act), weight(m, axis=1)), x, **buffers)
    if form == "addmm_t":  # aten.t as un-decomposed graphs (aot_autograd) hold it

        def fn(x):
            w = qd.dequantize_per_channel.default(qw, scales, zeros, 0, -128, 127, torch.int8)
            return torch.addmm(bias, _act(x, *act), w.t())

        return make_fx(fn)(x), [x]
    raise ValueError(form)


@pytest.mark.parametrize("form", ["addmm_permute", "mm_permute", "mm_in_out_axis1", "addmm_t"])
def test_quantized_matmul_runs_in_integers(form):
    gm, inputs = _linear_case(form)
    got, expected, ir = _tvm_and_torch(gm, inputs)
    assert _int32_ops(ir, "R.matmul(") == 1, ir
    assert_same_outputs(expected, got)
    assert relative_error(expected[0], got[0]) < KERNEL_RELATIVE_ERROR


def test_conv_with_channels_along_another_axis_computes_in_float():
    """Scales along the input channels cannot be taken out of the sum: the float rule runs."""
    qw = torch.randint(-127, 128, (4, 6, 3, 3), generator=_gen(30), dtype=torch.int8)
    scales = torch.rand(6, generator=_gen(31)) * 0.02 + 0.001

    def fn(m, x):
        w = qd.dequantize_per_channel.default(m.qw, m.s, None, 1, -128, 127, torch.int8)
        return F.conv2d(_act(x, 0.02, 128, 0, 255, torch.uint8), w, padding=1)

    gm, inputs = _exported(fn, torch.randn(1, 6, 7, 7, generator=_gen(32)), qw=qw, s=scales)
    got, expected, ir = _tvm_and_torch(gm, inputs)
    assert _int32_ops(ir, "R.nn.conv2d(") == 0
    assert_same_outputs(expected, got)


def test_matmul_whose_int32_sum_could_overflow_computes_in_float():
    """255 * 127 * 70000 > 2**31: such a layer stays in float rather than wrap around."""
    k = 70000
    qw = torch.full((2, k), 127, dtype=torch.int8)
    scales = torch.full((2,), 1e-4)

    def fn(m, x):
        w = qd.dequantize_per_channel.default(m.qw, m.s, None, 0, -128, 127, torch.int8)
        return torch.mm(_act(x, 0.01, 0, 0, 255, torch.uint8), w.permute(1, 0))

    x = torch.full((1, k), 10.0)  # saturates at 255: the sum would be 2.27e9
    gm, inputs = _exported(fn, x, qw=qw, s=scales)
    got, expected, ir = _tvm_and_torch(gm, inputs)
    assert _int32_ops(ir, "R.matmul(") == 0
    assert_same_outputs(expected, got)
    assert float(expected[0][0, 0]) > 2**31 * 0.01 * 1e-4  # the case really is that big


def test_float_weight_and_float_activation_keep_float_kernels():
    """Only a dequantized activation times a dequantized weight runs in integers."""
    qw, scales = _int8_weight(4, 6, 3, 3, seed=40)
    w_float = torch.randn(4, 6, 3, 3, generator=_gen(41))

    def fn(m, x):
        w = qd.dequantize_per_channel.default(m.qw, m.s, None, 0, -128, 127, torch.int8)
        return (
            F.conv2d(x, w, padding=1),  # float activation
            F.conv2d(_act(x, 0.02, 128, 0, 255, torch.uint8), m.wf, padding=1),  # float weight
        )

    gm, inputs = _exported(
        fn, torch.randn(1, 6, 7, 7, generator=_gen(42)), qw=qw, s=scales, wf=w_float
    )
    got, expected, ir = _tvm_and_torch(gm, inputs)
    assert _int32_ops(ir, "R.nn.conv2d(") == 0
    assert_same_outputs(expected, got)


# --------------------------------------------------------------------------------------------
# whole models through graphopt.optimize(quantize="int8")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),  # depthwise
        )  # fmt: skip
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 10)
    )


MODELS = {"convnet": (ConvNet, (4, 3, 8, 8), 4), "mlp": (_mlp, (16, 64), 3)}


@pytest.mark.parametrize("target", ["llvm", pytest.param("cuda", marks=pytest.mark.needs_gpu)])
@pytest.mark.parametrize("name", list(MODELS))
def test_quantized_model_runs_whole_in_tvm_with_its_int8_numerics(name, target):
    factory, shape, layers = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    if name == "convnet":
        model.features[1].running_mean.normal_(0, 0.2)
        model.features[1].running_var.uniform_(0.5, 2.0)
    calibration = [(torch.randn(*shape, generator=_gen(50 + i)),) for i in range(3)]
    x = torch.randn(*shape, generator=_gen(60)) * 1.5  # beyond the calibrated ranges too
    optimized = graphopt.optimize(
        model, calibration[0], target=target, quantize="int8", calibration=calibration
    )
    report = optimized.report
    assert report.fallbacks == []
    assert [p.target for p in report.partitions] == [f"tvm-{target}"]  # one piece, no torch
    assert all(layer.quantized for layer in report.quantization.layers)

    # The same int8 graph, run by PyTorch: the pipeline with the same options and data.
    cfg = Config(target=target, quantize="int8")
    captured = capture_export(model, calibration[0])
    batches = [list(batch) for batch in calibration]
    gm = run_pipeline(captured.gm, cfg, new_report(cfg), calibration=batches)
    summary = gm.meta["graphopt.quantization"]
    assert [(q.act_scale, q.act_zero_point) for q in summary.layers] == [
        (q.act_scale, q.act_zero_point) for q in report.quantization.layers
    ]
    with torch.no_grad():
        want = run_graph(gm, [x])[0]
        got = optimized(x)
        float_out = model(x)
    err = relative_error(want, got)
    assert err < 1e-5, err
    assert relative_error(float_out, got) > 1e-3  # int8 really ran (float is ~1e-7 off)

    # the integer kernels were taken: every quantized layer is an int32 conv or matmul
    ir = build_relax(gm, [x], cfg).script()
    assert _int32_ops(ir, "R.nn.conv2d(") + _int32_ops(ir, "R.matmul(") == layers
    assert 'float32") = R.nn.conv2d' not in ir and 'float32") = R.matmul' not in ir


def test_quantized_model_builds_cuda_kernels_without_a_gpu(cuda_kernels):
    """The int8 graph (integer conv/matmul included) goes through the CUDA codegen; nvcc,
    when present, checks the kernels compile. (Running them needs a GPU: none here.)"""
    from graphopt.backends.tvm.build import compile_relax

    model = ConvNet().eval()
    calibration = [[torch.randn(2, 3, 8, 8, generator=_gen(70 + i))] for i in range(2)]
    cfg = Config(target="cuda", quantize="int8")
    captured = capture_export(model, tuple(calibration[0]))
    gm = run_pipeline(captured.gm, cfg, new_report(cfg), calibration=calibration)
    mod = build_relax(gm, captured.example_inputs, cfg)
    assert _int32_ops(mod.script(), "R.nn.conv2d(") == 3
    source = cuda_kernels(compile_relax(mod, cfg), cfg)
    assert "int" in source
