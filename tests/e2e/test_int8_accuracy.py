"""int8 on real data: scikit-learn's digits (1,797 8x8 images), an MLP and a CNN trained here.

Each quantized model must stay within 1 point of its float top-1 accuracy on held-out digits,
really run int8 (outputs differ from float), and on target="cpu" reach oneDNN's int8 kernels.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import graphopt
from examples.int8_digits import BATCH, DigitsMLP, accuracy
from graphopt import int8
from graphopt.testing import relative_error


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_int8_torch_compile_keeps_accuracy_and_uses_onednn(digits, kind):
    models, calibration, test = digits
    model = models[kind]
    float_acc = accuracy(model, test)
    assert float_acc > 90  # the float model learned the task, so the comparison means something
    counters.clear()
    compiled = torch.compile(
        model, backend="graphopt", options={"quantize": "int8", "calibration": calibration}
    )
    int8_acc = accuracy(compiled, test)
    assert int8_acc >= float_acc - 1.0, (float_acc, int8_acc)
    # oneDNN int8 kernels, not float math on dequantized tensors
    lowered = (
        counters["inductor"]["qlinear_unary_lower_count"]
        + counters["inductor"]["qconv_unary_lower_count"]
    )
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] >= 1
    assert lowered >= (3 if kind == "mlp" else 2)
    if kind == "cnn":
        assert counters["inductor"]["qconv_weight_prepack_matcher_count"] == 3
    report = graphopt.reports()[-1]
    q = report.quantization
    assert q is not None and q.calibration_batches == 4
    # int8 weights: a quarter of the bytes, plus float biases and per-channel scales
    assert report.weight_bytes_after < 0.35 * report.weight_bytes_before, (
        report.weight_bytes_before,
        report.weight_bytes_after,
    )
    assert all(layer.quantized for layer in q.layers) and len(q.layers) == (
        3 if kind == "mlp" else 4
    )
    x = test[0][:BATCH]
    with torch.no_grad():
        err = relative_error(model(x), compiled(x))
    assert 1e-4 < err < 0.1  # int8 really ran (a pass that stayed in float would give ~1e-7)
    print(f"digits {kind}: float {float_acc:.1f}%, int8 {int8_acc:.1f}%, output error {err:.3%}")


@pytest.mark.parametrize("target", ["cpu", "llvm"])
def test_int8_optimize_keepsaccuracy(digits, target):
    models, calibration, test = digits
    model = models["cnn"]
    optimized = graphopt.optimize(
        model, calibration[0], target=target, quantize="int8", calibration=calibration
    )
    assert optimized.report.quantization is not None
    assert accuracy(optimized, test) >= accuracy(model, test) - 1.0


def test_without_calibration_data_first_calls_calibrate_then_int8(digits, caplog):
    models, calibration, test = digits
    model = models["mlp"]
    compiled = torch.compile(
        model, backend="graphopt", options={"quantize": "int8", "calibration": 3}
    )
    x = test[0][:BATCH]
    with torch.no_grad():
        with caplog.at_level("WARNING", logger="graphopt"):
            first = compiled(calibration[0][0])
        assert "first 3 calls run in float" in caplog.text
        assert relative_error(model(calibration[0][0]), first) < 1e-5  # float while calibrating
        assert "calibrating, 2 more" in str(graphopt.reports()[-1])
        compiled(calibration[1][0])
        compiled(calibration[2][0])  # the third call quantizes and lowers
        assert graphopt.reports()[-1].quantization.calibration_batches == 3
        assert relative_error(model(x), compiled(x)) > 1e-4  # int8 now
    assert accuracy(compiled, test) >= accuracy(model, test) - 1.0


def test_training_graph_stays_float_and_says_so(caplog):
    model = DigitsMLP()
    x = torch.randn(8, 1, 8, 8)
    compiled = torch.compile(model, backend="graphopt", options={"quantize": "int8"})
    with caplog.at_level("WARNING", logger="graphopt"):
        out = compiled(x)
    assert "this training graph stays float" in caplog.text
    torch.testing.assert_close(out, model(x))
    out.sum().backward()  # gradients flow as without the option
    assert model.net[1].weight.grad is not None


def test_first_calls_calibration_with_dynamic_batch_and_verify():
    model = DigitsMLP().eval()
    compiled = torch.compile(
        model,
        backend="graphopt",
        dynamic=True,
        options={"quantize": "int8", "calibration": 2, "verify": True},
    )
    with torch.no_grad():
        for batch in (3, 5):  # float while calibrating
            x = torch.randn(batch, 1, 8, 8)
            assert relative_error(model(x), compiled(x)) < 1e-5
        for batch in (7, 11):  # one int8 graph for every batch size
            x = torch.randn(batch, 1, 8, 8)
            assert 1e-4 < relative_error(model(x), compiled(x)) < 0.2
    report = graphopt.reports()[-1]
    assert report.verified and report.quantization.calibration_batches == 2
    assert len(graphopt.reports()) == 1  # no recompile for new batch sizes


@pytest.mark.parametrize(
    "make, shape", [("ResidualCNN", (2, 3, 16, 16)), ("DepthwiseSeparable", (2, 16, 8, 8))]
)
def test_int8_cpu_fuses_residual_adds_into_convs_as_pt2e_does(make, shape):
    """Every residual add after a conv runs inside the int8 conv (oneDNN's sum post-op), as many
    as torchao's PT2E X86InductorQuantizer gets inductor to fuse on the same model."""
    import torchao.quantization.pt2e.quantize_pt2e as pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torch._inductor import config as inductor_config

    import tests.models

    torch.manual_seed(0)
    model = getattr(tests.models, make)().eval()
    batches = [(torch.randn(*shape),) for _ in range(4)]
    x = batches[0][0]
    counters.clear()
    compiled = torch.compile(
        model, backend="graphopt", options={"quantize": "int8", "calibration": batches}
    )
    with torch.no_grad():
        err = relative_error(model(x), compiled(x))
    ours = counters["inductor"]["qconv2d_binary_lower_count"]
    torch._dynamo.reset()
    counters.clear()
    config = xiq.get_default_x86_inductor_quantization_config(
        reduce_range=int8.host_activation_qmax() < 255
    )
    exported = torch.export.export(model, (x,), strict=True).module()
    prepared = pt2e.prepare_pt2e(exported, xiq.X86InductorQuantizer().set_global(config))
    for batch in batches:
        prepared(*batch)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        torch.compile(pt2e.convert_pt2e(prepared))(x)
    theirs = counters["inductor"]["qconv2d_binary_lower_count"]
    adds = {"ResidualCNN": 2, "DepthwiseSeparable": 1}[make]
    assert ours == theirs == adds, (ours, theirs)
    assert 1e-4 < err < 0.05, err
