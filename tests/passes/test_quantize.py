import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphopt import int8
from graphopt.config import Config
from graphopt.passes.fold_constants import fold_constants
from graphopt.passes.quantize import find_sites, quantize
from graphopt.testing import relative_error
from tests.passes.conftest import batch_dim, capture, ops

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
INT8 = Config(quantize="int8", target="llvm")  # full 8-bit activations on every host
QDQ = [qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default]


def _prepared(model, *inputs, dynamic_shapes=None):
    gm, example = capture(model, *inputs, dynamic_shapes=dynamic_shapes)
    fold_constants(gm, Config())  # as in the pipeline: linear weights become [in, out] constants
    return gm, example


def _batches(*shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(*shape, generator=g)] for _ in range(n)]


def test_linear_becomes_qdq_with_int8_weight_and_exact_numerics():
    model = nn.Linear(20, 7).eval()
    x = torch.randn(5, 20)
    gm, _ = _prepared(model, x)
    calibration = _batches(5, 20)
    result = quantize(gm, INT8, calibration)
    assert result.modified and result.stats == {"quantized": 1, "kept_float": 0}
    counts = ops(result.gm)
    assert counts[qd.quantize_per_tensor.default] == 1
    assert counts[qd.dequantize_per_tensor.default] == 1
    assert counts[qd.dequantize_per_channel.default] == 1
    (mm,) = [n for n in result.gm.graph.nodes if n.target in (aten.addmm.default, aten.mm.default)]
    weight = mm.args[-1]
    assert weight.target is aten.permute.default
    assert weight.args[0].target is qd.dequantize_per_channel.default
    # the numbers are graphopt.int8's: quantized input, per-channel int8 weight, float bias
    lo = min(float(b[0].min()) for b in calibration)
    hi = max(float(b[0].max()) for b in calibration)
    scale, zp = int8.activation_qparams(lo, hi)
    qw, w_scales = int8.quantize_weight(model.weight)
    expected = F.linear(
        int8.dequantize(int8.quantize(x, scale, zp), scale, zp),
        qw.float() * w_scales.view(-1, 1),
        model.bias,
    )
    with torch.no_grad():
        torch.testing.assert_close(result.gm(x)[0], expected)
        assert not torch.allclose(result.gm(x)[0], model(x))  # it really is int8
    summary = result.gm.meta["graphopt.quantization"]
    assert summary.layers[0].quantized and summary.layers[0].act_zero_point == zp
    assert 0 < summary.output_error < 0.05


def test_conv_weight_is_per_channel_int8():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 10, 10)
    gm, _ = _prepared(model, x)
    result = quantize(gm, INT8, _batches(2, 3, 10, 10))
    assert result.stats["quantized"] == 2
    convs = [n for n in result.gm.graph.nodes if n.target is aten.convolution.default]
    for conv in convs:
        assert conv.args[0].target is qd.dequantize_per_tensor.default
        dq_w = conv.args[1]
        assert dq_w.target is qd.dequantize_per_channel.default
        assert dq_w.args[3:] == (0, -128, 127, torch.int8)
        qweight = getattr(result.gm, dq_w.args[0].target)
        assert qweight.dtype == torch.int8 and qweight.dim() == 4
        assert qweight.shape[0] == conv.meta["val"].shape[1]  # per output channel
    with torch.no_grad():
        assert relative_error(model(x), result.gm(x)[0]) < 0.05


def test_layers_reading_one_activation_share_its_quantize_pair():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 4), nn.Linear(16, 3)

        def forward(self, x):
            return self.a(x), self.b(x)

    gm, _ = _prepared(TwoHeads(), torch.randn(2, 16))
    result = quantize(gm, INT8, _batches(2, 16))
    assert result.stats["quantized"] == 2
    assert ops(result.gm)[qd.quantize_per_tensor.default] == 1


def test_nothing_to_quantize_and_quantize_off_are_noops():
    gm, _ = _prepared(nn.Sequential(nn.ReLU(), nn.Softmax(-1)), torch.randn(2, 8))
    code = gm.code
    assert quantize(gm, INT8, _batches(2, 8)).modified is False
    assert gm.code == code
    gm, _ = _prepared(nn.Linear(4, 4), torch.randn(2, 4))
    code = gm.code
    assert quantize(gm, Config(), None).modified is False
    assert gm.code == code


def test_calibration_is_required():
    gm, _ = _prepared(nn.Linear(4, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="calibration batch"):
        quantize(gm, INT8, [])


def test_only_2d_non_transposed_convs_and_constant_weights_are_sites():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(3, 4, 3)
            self.ct = nn.ConvTranspose2d(3, 4, 3)

        def forward(self, x, y, w):
            return self.c1(x), self.ct(y), y.flatten(1) @ w

    inputs = (torch.randn(2, 3, 9), torch.randn(2, 3, 5, 5), torch.randn(75, 6))
    gm, _ = _prepared(Mixed(), *inputs)
    assert find_sites(gm) == []  # weights that are inputs are not quantized either


def test_percentile_observer_ignores_rare_outliers():
    model = nn.Linear(32, 8).eval()
    calibration = _batches(256, 32, n=16)
    calibration[0][0][0, 0] = 500.0  # one outlier among 131k values
    scales = {}
    for observer in ("minmax", "percentile"):
        gm, _ = _prepared(model, torch.randn(64, 32))
        cfg = Config(quantize="int8", target="llvm", observer=observer)
        result = quantize(gm, cfg, calibration)
        scales[observer] = result.gm.meta["graphopt.quantization"].layers[0].act_scale
    assert scales["percentile"] < scales["minmax"] / 20


def test_accuracy_budget_keeps_the_sensitive_layer_in_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight[:, 0] *= 1e-3  # so the huge feature does not dominate the outputs
    g = torch.Generator().manual_seed(3)
    # the first layer's input has one huge feature: per-tensor int8 loses all the others
    calibration = []
    for _ in range(4):
        x = torch.randn(32, 16, generator=g)
        x[:, 0] *= 1000
        calibration.append([x])
    gm, _ = _prepared(model, calibration[0][0])
    plain = quantize(gm, INT8, calibration).gm.meta["graphopt.quantization"]
    assert plain.output_error > 0.05 and not plain.kept_float

    gm, _ = _prepared(model, calibration[0][0])
    cfg = Config(quantize="int8", target="llvm", accuracy_budget=0.05)
    result = quantize(gm, cfg, calibration)
    summary = result.gm.meta["graphopt.quantization"]
    assert summary.output_error <= 0.05
    assert result.stats == {"quantized": 1, "kept_float": 1}
    first, second = summary.layers
    assert not first.quantized and second.quantized
    assert first.sensitivity > second.sensitivity
    with torch.no_grad():  # the reported error is what the rewritten graph does
        x = calibration[1][0]
        assert relative_error(model(x), result.gm(x)[0]) < 0.05


def test_dynamic_batch_graph_quantizes_and_runs_other_batches():
    model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    gm, _ = _prepared(model, torch.randn(4, 12), dynamic_shapes=batch_dim())
    result = quantize(gm, INT8, _batches(4, 12) + _batches(9, 12, seed=1))
    assert result.stats["quantized"] == 2
    with torch.no_grad():
        for batch in (2, 7):
            x = torch.randn(batch, 12)
            assert relative_error(model(x), result.gm(x)[0]) < 0.05


def test_cpu_residual_adds_read_their_other_operand_quantized():
    """target="cpu": add(conv, other) reads `other` dequantized, so inductor can fuse the add into
    the int8 conv; of two convs (ResNet's downsample) the earlier one's output is quantized."""
    from graphopt.passes.fold_batchnorm import fold_batchnorm
    from tests.models import ResidualCNN

    def prepared():
        torch.manual_seed(0)
        gm, _ = _prepared(ResidualCNN().eval(), torch.randn(2, 3, 16, 16))
        fold_batchnorm(gm, Config())  # as in the pipeline: each conv feeds its add directly
        fold_constants(gm, Config())
        return gm

    gm = prepared()
    quantize(gm, Config(quantize="int8", target="cpu"), _batches(2, 3, 16, 16))
    adds = [n for n in gm.graph.nodes if n.target is aten.add.Tensor]
    assert len(adds) == 2
    for add in adds:
        convs = [a for a in add.args if a.target is aten.convolution.default]
        dequantized = [a for a in add.args if a.target is qd.dequantize_per_tensor.default]
        assert len(convs) == 1 and len(dequantized) == 1, add.args
    # the downsample conv (computed first) gets a quantize after it; target="llvm" leaves the
    # adds in float
    gm = prepared()
    quantize(gm, INT8, _batches(2, 3, 16, 16))
    for add in (n for n in gm.graph.nodes if n.target is aten.add.Tensor):
        assert all(a.target is not qd.dequantize_per_tensor.default for a in add.args)


def test_cpu_residual_add_operand_with_other_readers_stays_float():
    """The operand of a fusable add is quantized only when the add is its sole reader: a value
    that other ops also read is never handed to them quantized."""

    class ConvPlusShared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            shared = x * 2
            return self.conv(x) + shared, shared.mean()

    torch.manual_seed(0)
    gm, _ = _prepared(ConvPlusShared().eval(), torch.randn(1, 4, 6, 6))
    quantize(gm, Config(quantize="int8", target="cpu"), _batches(1, 4, 6, 6))
    (shared,) = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]
    assert all(u.target is not qd.quantize_per_tensor.default for u in shared.users)
    (add,) = [n for n in gm.graph.nodes if n.target is aten.add.Tensor]
    assert shared in add.args
