"""target="onnx": the optimized graph exported to ONNX and run by onnxruntime."""

import onnx
import pytest
import torch

import graphopt
from graphopt.backends.onnx import export_onnx
from graphopt.testing import assert_same_outputs, relative_error
from tests.models import MLP, ResidualCNN, TransformerBlock


@pytest.mark.parametrize(
    "make, shape",
    [(MLP, (4, 32)), (ResidualCNN, (2, 3, 16, 16)), (TransformerBlock, (2, 10, 32))],
    ids=["mlp", "cnn", "transformer"],
)
def test_fp32_models_run_in_onnxruntime_and_match_eager(make, shape):
    model = make().eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        compiled = torch.compile(model, backend="graphopt", options={"target": "onnx"})
        assert_same_outputs(model(x), compiled(x))
    report = graphopt.reports()[-1]
    assert [p.target for p in report.partitions] == ["onnxruntime"] and not report.fallbacks


def test_int8_graph_becomes_qdq_onnx_close_to_its_pytorch_run():
    model = ResidualCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    on_ort = graphopt.optimize(model, (x,), target="onnx", quantize="int8", calibration=calibration)
    on_cpu = graphopt.optimize(model, (x,), target="cpu", quantize="int8", calibration=calibration)
    assert on_ort.report.quantization.layers and not on_ort.report.fallbacks
    with torch.no_grad():
        err = relative_error(on_cpu(x), on_ort(x))  # same scales on this host: same int8 graph
        assert err < 0.01, err
        assert relative_error(model(x), on_ort(x)) > 1e-4  # and it is int8, not float


def test_exported_int8_model_holds_quantize_dequantize_nodes():
    from graphopt.capture import capture_export
    from graphopt.config import Config
    from graphopt.pipeline import run_pipeline
    from graphopt.report import Report

    model = MLP().eval()
    x = torch.randn(4, 32)
    captured = capture_export(model, (x,))
    cfg = Config(target="onnx", quantize="int8")
    gm = run_pipeline(captured.gm, cfg, Report("g", "onnx"), calibration=[[x]])
    proto = onnx.load_from_string(export_onnx(gm, [x]))
    onnx.checker.check_model(proto)
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_dynamic_shapes_fall_back_to_pytorch_and_say_so():
    model = MLP().eval()
    compiled = torch.compile(model, backend="graphopt", dynamic=True, options={"target": "onnx"})
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert_same_outputs(model(x), compiled(x))
    report = graphopt.reports()[-1]
    assert report.fallbacks and "static shapes only" in report.fallbacks[0].reason
    assert "dynamic_shapes=" in report.fallbacks[0].reason  # says what does work


def test_onnxruntime_fuses_every_int8_conv_into_its_integer_kernel(tmp_path):
    """A quantize after each conv (and quantized residual adds) let onnxruntime turn every
    DequantizeLinear -> Conv into QLinearConv; a float Conv would recompute its weights."""
    import onnxruntime as ort

    from graphopt.capture import capture_export
    from graphopt.config import Config
    from graphopt.pipeline import run_pipeline
    from graphopt.report import Report

    model = ResidualCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    captured = capture_export(model, (x,))
    cfg = Config(target="onnx", quantize="int8")
    batches = [[torch.randn(2, 3, 16, 16)] for _ in range(3)]
    gm = run_pipeline(captured.gm, cfg, Report("g", "onnx"), calibration=batches)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(export_onnx(gm, [x]), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    convs = sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.convolution.default)
    assert ops.count("QLinearConv") == convs and "Conv" not in ops, ops
    assert "QLinearAdd" in ops  # the residual add runs in int8 too


def test_onnxruntime_threads_stop_spinning_when_a_call_returns():
    """onnxruntime's idle threads spin by default for a while after Run() (about 0.05 CPU-s
    here), on cores PyTorch's ops need next; graphopt's sessions stop them on return."""
    import time

    from graphopt.backends.onnx import OnnxRunner

    model = torch.nn.Sequential(
        torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)
    ).eval()
    x = torch.randn(64, 256)
    run = OnnxRunner(export_onnx(torch.export.export(model, (x,)).module(), [x]))
    options = run.session.get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    for _ in range(5):
        (out,) = run(x)
    assert_same_outputs(model(x).detach(), out)
    cpu = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - cpu < 0.02


@pytest.mark.parametrize(("mode", "bits"), [("int8_weight_only", 8), ("int4_weight_only", 4)])
def test_weight_only_decoder_exports_matmul_nbits_that_onnxruntime_runs(tmp_path, mode, bits):
    """A weight-only decoder's linear layers become onnxruntime's MatMulNBits: the file holds
    the packed weights (no float copy), and onnxruntime loading it gives graphopt's numbers."""
    import numpy as np
    import onnxruntime as ort

    from tests.models import tiny_decoder

    model = tiny_decoder("llama", use_cache=False)
    ids = torch.randint(1, 128, (1, 16))
    options = dict(quantize=mode, group_size=32)
    on_cpu = graphopt.optimize(model, (ids,), **options)
    exported = graphopt.export(model, (ids,), tmp_path / "out", format="onnx", **options)
    proto = onnx.load(str(exported.path / "model.onnx"))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 15 and {n.domain for n in nbits} == {"com.microsoft"}
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {bits}
    big_floats = [
        i.name
        for i in proto.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 64 * 64
    ]
    assert not big_floats, big_floats  # every weight and the embedding table are quantized
    session = ort.InferenceSession(str(exported.path / "model.onnx"))
    (logits, *_) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        expected = on_cpu(ids).logits
        assert relative_error(expected, torch.from_numpy(logits)) < 1e-5
        on_ort = graphopt.optimize(model, (ids,), target="onnx", **options)
        assert relative_error(expected, on_ort(ids).logits) < 1e-5
    assert [p.target for p in on_ort.report.partitions] == ["onnxruntime"]
