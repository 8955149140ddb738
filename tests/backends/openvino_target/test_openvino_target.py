"""target="openvino": the optimized graph run by OpenVINO's runtime, and its IR artifacts."""

import subprocess
import sys

import pytest
import torch

import graphopt
from graphopt.testing import assert_same_outputs, relative_error
from tests.models import MLP, ResidualCNN, TransformerBlock


@pytest.mark.parametrize(
    "make, shape",
    [(MLP, (4, 32)), (ResidualCNN, (2, 3, 16, 16)), (TransformerBlock, (2, 10, 32))],
    ids=["mlp", "cnn", "transformer"],
)
def test_fp32_models_run_in_openvino_and_match_eager(make, shape):
    model = make().eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        compiled = torch.compile(model, backend="graphopt", options={"target": "openvino"})
        assert_same_outputs(model(x), compiled(x))  # f32: OpenVINO's bf16 default is off
    report = graphopt.reports()[-1]
    assert [p.target for p in report.partitions] == ["openvino"] and not report.fallbacks


def test_bert_from_transformers_runs_in_openvino():
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, vocab_size=500)  # fmt: skip
    model = BertModel(config).eval()
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        fast = graphopt.optimize(model, (ids,), target="openvino")
        assert_same_outputs(model(ids).last_hidden_state, fast(ids).last_hidden_state)
    assert not fast.report.fallbacks


def test_int8_graph_runs_in_openvino_close_to_its_onnxruntime_run():
    model = ResidualCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    options = {"quantize": "int8", "calibration": calibration}
    on_ov = graphopt.optimize(model, (x,), target="openvino", **options)
    on_ort = graphopt.optimize(model, (x,), target="onnx", **options)
    assert on_ov.report.quantization.layers and not on_ov.report.fallbacks
    with torch.no_grad():
        assert relative_error(on_ort(x), on_ov(x)) < 0.02  # the same QDQ graph
        assert relative_error(model(x), on_ov(x)) > 1e-4  # and it is int8, not float


def test_dynamic_shapes_fall_back_to_pytorch_and_say_so():
    model = MLP().eval()
    compiled = torch.compile(
        model, backend="graphopt", dynamic=True, options={"target": "openvino"}
    )
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert_same_outputs(model(x), compiled(x))
    report = graphopt.reports()[-1]
    assert report.fallbacks and "static shapes only" in report.fallbacks[0].reason


def test_weight_only_quantization_is_refused_with_the_accepted_values():
    with pytest.raises(ValueError, match="openvino"):
        graphopt.optimize(MLP().eval(), (torch.randn(4, 32),), target="openvino",
                          quantize="int8_weight_only")  # fmt: skip


def test_ir_artifact_with_a_dynamic_batch_runs_in_plain_openvino(tmp_path):
    model = ResidualCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    batch = torch.export.Dim("batch", min=1, max=64)
    out = tmp_path / "cnn"
    graphopt.export(model, (x,), out, format="openvino", dynamic_shapes=({0: batch},))
    assert (out / "model.xml").exists() and (out / "model.bin").exists()
    loaded = graphopt.load(out)
    x5 = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert_same_outputs(model(x5), loaded(x5))
    # OpenVINO alone, in a fresh process without graphopt, reads and runs the IR
    torch.save({"x": x5, "y": model(x5).detach()}, tmp_path / "io.pt")
    script = (
        "import openvino as ov, torch, sys\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"m = ov.Core().compile_model({str(out / 'model.xml')!r}, 'CPU', "
        "{'INFERENCE_PRECISION_HINT': 'f32'})\n"
        "y = torch.from_numpy(m(io['x'].numpy())[0])\n"
        "assert 'graphopt' not in sys.modules\n"
        "torch.testing.assert_close(y, io['y'], rtol=1e-4, atol=1e-4)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
