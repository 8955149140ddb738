"""Models quantized with torchao's PT2E flow compile through graphopt to the same int8 kernels."""

import pytest
import torch
import torchao.quantization.pt2e.quantize_pt2e as pt2e
import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
from torch import nn
from torch._dynamo.utils import counters

import graphopt
from graphopt import int8
from graphopt.testing import relative_error


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _pt2e_quantized(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    exported = torch.export.export(model.eval(), (batches[0],), strict=True).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = pt2e.prepare_pt2e(exported, quantizer)
    for x in batches:
        prepared(x)
    return pt2e.convert_pt2e(prepared)


@pytest.fixture()
def quantized():
    torch.manual_seed(0)
    batches = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    return _pt2e_quantized(Small(), batches), batches


def test_pt2e_model_reaches_onednn_int8_kernels_through_graphopt(quantized):
    model, batches = quantized
    x = batches[1]
    with torch.no_grad():
        counters.clear()
        got = torch.compile(model, backend="graphopt")(x)
        ours = dict(counters["inductor"])
        torch._dynamo.reset()
        counters.clear()
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            want = torch.compile(model)(x)  # PT2E's own path: inductor with freezing
        theirs = dict(counters["inductor"])
    for key in ("qconv_unary_lower_count", "qlinear_unary_lower_count"):
        assert ours.get(key, 0) == theirs.get(key, 0) >= 1, (key, ours, theirs)
    torch.testing.assert_close(got, want)  # the same kernels give the same numbers
    report = graphopt.reports()[-1]
    assert report.quantization is None  # graphopt did not quantize again: it was already int8
    ops = report.partitions[0].ops
    assert ops["quantized_decomposed.dequantize_per_channel.default"] == 2
    if int8.host_activation_qmax() < 255:  # PT2E's 8-bit activations saturate here: say so
        assert any("no VNNI" in w for w in report.warnings)
    else:
        assert not report.warnings


def test_quantize_option_leaves_pt2e_layers_alone(quantized):
    model, batches = quantized
    with torch.no_grad():
        compiled = torch.compile(
            model,
            backend="graphopt",
            options={"quantize": "int8", "calibration": [(b,) for b in batches]},
        )
        got = compiled(batches[0])
    q = graphopt.reports()[-1].quantization
    assert q is not None and q.layers == []  # weights are int8 already: nothing to redo
    with torch.no_grad():
        assert relative_error(model(batches[0]), got) < 0.2


def test_pt2e_model_on_tvm_matches_its_int8_graph(quantized):
    model, batches = quantized
    x = batches[2]
    with torch.no_grad():
        got = torch.compile(model, backend="graphopt", options={"target": "llvm"})(x)
        want = model(x)  # the QDQ graph run by PyTorch, op by op
    report = graphopt.reports()[-1]
    assert not report.fallbacks, report.fallbacks
    assert relative_error(want, got) < 1e-5
