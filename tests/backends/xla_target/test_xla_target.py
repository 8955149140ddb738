"""target="xla" (JAX/XLA, the CPU here) and format="stablehlo" (jax.export artifacts)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import graphopt
from graphopt import targets
from graphopt.backends.xla.rules import XLA
from graphopt.backends.xla.translate import LoweringError, build_jax
from graphopt.config import Config
from graphopt.errors import UnsupportedOpError
from graphopt.testing import assert_same_outputs, relative_error
from tests.e2e.test_training import _state, train
from tests.models import MLP, ResidualCNN, SpectralHead, TransformerBlock, tiny_bert, tiny_llama

XLA_CFG = Config(target="xla")


def _partitions(report) -> list[str]:
    return [p.target for p in report.partitions]


@pytest.mark.parametrize(
    "make, shape",
    [(MLP, (4, 32)), (ResidualCNN, (2, 3, 16, 16)), (TransformerBlock, (2, 10, 32))],
    ids=["mlp", "cnn", "transformer"],
)
def test_fp32_models_run_in_xla_and_match_eager(make, shape):
    model = make().eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        compiled = torch.compile(model, backend="graphopt", options={"target": "xla"})
        assert_same_outputs(model(x), compiled(x))
    report = graphopt.reports()[-1]
    assert _partitions(report) == ["xla"] and not report.fallbacks


def test_bert_and_llama_from_transformers_run_in_xla():
    bert = tiny_bert()
    ids = torch.randint(0, 100, (2, 12))
    llama = tiny_llama(use_cache=False).eval()
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        fast = graphopt.optimize(bert, (ids,), target="xla")
        assert_same_outputs(bert(ids).last_hidden_state, fast(ids).last_hidden_state)
        assert not fast.report.fallbacks
        fast = graphopt.optimize(llama, (tokens,), target="xla")
        assert_same_outputs(llama(tokens).logits, fast(tokens).logits)
        assert not fast.report.fallbacks


def test_dynamic_batch_compiles_one_graph_for_every_size():
    model = MLP().eval()
    compiled = torch.compile(model, backend="graphopt", dynamic=True, options={"target": "xla"})
    with torch.no_grad():
        for size in (3, 5, 9):
            x = torch.randn(size, 32)
            assert_same_outputs(model(x), compiled(x))
    report = graphopt.reports()[-1]
    assert _partitions(report) == ["xla"] and not report.fallbacks
    assert len(graphopt.reports()) == 1  # one graph from dynamo, traced by XLA per size


def test_bfloat16_is_as_close_to_fp32_as_inductors_bfloat16():
    model = ResidualCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    on_xla = graphopt.optimize(model, (x,), target="xla", dtype="bfloat16")
    on_cpu = graphopt.optimize(model, (x,), target="cpu", dtype="bfloat16")
    assert _partitions(on_xla.report) == ["xla"] and not on_xla.report.fallbacks
    with torch.no_grad():
        expected, got = model(x), on_xla(x)
        assert got.dtype == torch.float32  # the model's interface is kept
        assert 1e-5 < relative_error(expected, got) < 2 * relative_error(expected, on_cpu(x))


def test_int8_is_bit_exact_with_the_tvm_int8_path():
    """The integer convolutions and matmuls accumulate in int32 from the same operands as the
    TVM rules, so both give the same bits; and they are int8, not float."""
    model = ResidualCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    options = {"quantize": "int8", "calibration": calibration}
    on_xla = graphopt.optimize(model, (x,), target="xla", **options)
    on_tvm = graphopt.optimize(model, (x,), target="llvm", **options)
    assert on_xla.report.quantization.layers and not on_xla.report.fallbacks
    with torch.no_grad():
        assert torch.equal(on_xla(x), on_tvm(x))
        assert 1e-4 < relative_error(model(x), on_xla(x)) < 0.05


def test_int8_linear_layers_are_bit_exact_with_the_tvm_int8_path():
    model = MLP(dropout=0.0).eval()
    x = torch.randn(4, 32)
    options = {"quantize": "int8", "calibration": [(torch.randn(4, 32),) for _ in range(4)]}
    on_xla = graphopt.optimize(model, (x,), target="xla", **options)
    on_tvm = graphopt.optimize(model, (x,), target="llvm", **options)
    assert len(on_xla.report.quantization.layers) == 3 and not on_xla.report.fallbacks
    with torch.no_grad():
        assert torch.equal(on_xla(x), on_tvm(x))


def test_int8_bert_matches_the_tvm_int8_path():
    """The integer matmuls are exact in both; the float ops between them (layer norm, softmax,
    GELU) differ in the last bits between XLA and TVM."""
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 12))
    calibration = [(torch.randint(0, 100, (2, 12)),) for _ in range(4)]
    options = {"quantize": "int8", "calibration": calibration}
    on_xla = graphopt.optimize(model, (ids,), target="xla", **options)
    on_tvm = graphopt.optimize(model, (ids,), target="llvm", **options)
    assert on_xla.report.quantization.layers and not on_xla.report.fallbacks
    with torch.no_grad():
        got = on_xla(ids).last_hidden_state
        assert relative_error(on_tvm(ids).last_hidden_state, got) < 1e-5
        assert relative_error(model(ids).last_hidden_state, got) > 1e-5  # int8, not float


LLM_MODES = ["int8_weight_only", "int4_weight_only", "int8_dynamic"]


@pytest.mark.parametrize("mode", LLM_MODES)
def test_quantized_llama_runs_in_xla_as_on_the_cpu_target(mode):
    """The graph pass's quantized layers lower to XLA (no layer in PyTorch), with the numbers
    of graphopt's CPU kernels up to float rounding; quantized, not float."""
    llama = tiny_llama(use_cache=False).eval()
    tokens = torch.randint(0, 128, (2, 16))
    options = {"quantize": mode, "group_size": 32}
    on_xla = graphopt.optimize(llama, (tokens,), target="xla", **options)
    on_cpu = graphopt.optimize(llama, (tokens,), target="cpu", **options)
    assert len(on_xla.report.quantization.layers) == 16  # 15 linear layers, the embedding
    assert _partitions(on_xla.report) == ["xla"] and not on_xla.report.fallbacks
    with torch.no_grad():
        got, expected = on_xla(tokens).logits, on_cpu(tokens).logits
        assert relative_error(expected, got) < 2e-6
        assert relative_error(llama(tokens).logits, got) > 1e-3


@pytest.mark.parametrize("mode", LLM_MODES)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_swapped_quantized_layers_match_their_reference_under_torch_compile(mode, bias):
    """`quantize_weights_`'s modules (int8 weights in the kernels' tiled layout where their
    shape tiles, as here) compiled for XLA against the ops' reference implementations. Dynamic
    int8 is the same integer arithmetic to the bit; a bias may be fused into one multiply-add
    by XLA (a last-bit difference)."""
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 256, bias=bias), torch.nn.ReLU(), torch.nn.Linear(256, 64, bias=bias)
    ).eval()
    summary = graphopt.quantize_weights_(model, mode, group_size=32)
    assert len(summary.layers) == 2
    if mode == "int8_weight_only":
        assert model[0].weight.dim() == 4  # tiled
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, backend="graphopt", options={"target": "xla"})(x)
    report = graphopt.reports()[-1]
    assert _partitions(report) == ["xla"] and not report.fallbacks
    if mode == "int8_dynamic" and not bias:
        assert torch.equal(expected, got)
    else:
        assert relative_error(expected, got) < 2e-6


def test_quantized_llama_decodes_through_xla_with_a_static_cache():
    """model.generate with the forward compiled for XLA: the tokens of the quantized eager
    model; the cache writes (in-place copies) run in PyTorch, named."""
    llama = tiny_llama().eval()
    graphopt.quantize_weights_(llama, "int8_weight_only")
    ids = torch.randint(1, 128, (1, 8))

    def generate():
        return llama.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0,
                              max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              cache_implementation="static", max_cache_len=32)  # fmt: skip

    with torch.no_grad():
        expected = generate()
        llama.forward = torch.compile(llama.forward, backend="graphopt", options={"target": "xla"})
        assert torch.equal(generate(), expected)
    report = graphopt.reports()[-1]
    assert "xla" in _partitions(report)
    assert {f.op for f in report.fallbacks} <= {"aten.copy_.default"}


@pytest.mark.parametrize(
    "case, in_pytorch",
    [
        ("residual_cnn", "aten.convolution_backward.default"),
        ("llama", "aten._scaled_dot_product_flash_attention_for_cpu_backward.default"),
    ],
)
def test_training_matches_eager_and_names_what_runs_in_pytorch(case, in_pytorch):
    """Forward and backward graphs of aot_autograd: the same losses, weights and gradients as
    eager after two SGD steps; ops without a rule run in PyTorch, named."""
    expected_losses, expected = train(case, compiled=False, steps=2)
    torch._dynamo.reset()
    losses, model = train(case, compiled=True, steps=2, options={"target": "xla"})
    assert_same_outputs(expected_losses, losses)
    assert_same_outputs(_state(expected), _state(model))
    reports = graphopt.reports()
    assert {r.mode for r in reports} == {"training-forward", "training-backward"}
    assert any(p.target == "xla" for r in reports for p in r.partitions)
    assert in_pytorch in {f.op for r in reports for f in r.fallbacks}


def test_logcumsumexp_gradient_keeps_torchs_running_precision():
    """Its gradient is exp(a) - exp(b) of two scans, which magnifies a scan's rounding: the
    XLA scans keep torch's float64 running value on a CPU. The OpInfo gradient sweep's case
    (1.9e-3 off eager with float32 scans), run as the sweep runs it."""
    from tests.opinfo import sweep

    op = sweep.float32_ops("grad")["logcumsumexp"]
    outcome = sweep.classify(op, "xla", "grad")
    assert outcome.status == "match", outcome.detail


def test_unsupported_op_runs_in_pytorch_and_is_named():
    model = SpectralHead().eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled = torch.compile(model, backend="graphopt", options={"target": "xla"})
        assert_same_outputs(model(x), compiled(x))
    report = graphopt.reports()[-1]
    assert "xla" in _partitions(report)
    assert any("fft" in f.op for f in report.fallbacks)


def test_fallback_error_raises_naming_the_op():
    with pytest.raises(UnsupportedOpError, match="fft"):
        graphopt.optimize(SpectralHead().eval(), (torch.randn(3, 16),), target="xla",
                          fallback="error")  # fmt: skip


def test_a_rule_check_refuses_with_a_reason_and_tracing_raises_lowering_error():
    x = torch.randn(1, 2, 5, 5, dtype=torch.bfloat16)
    weight = torch.randn(2, 3, 3, 3, dtype=torch.bfloat16)
    gm = make_fx(lambda x: F.conv_transpose2d(x, weight))(x)
    conv = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.convolution.default)
    assert "transposed" in XLA.unsupported_reason(conv, XLA_CFG)
    with pytest.raises(LoweringError, match=conv.name):
        build_jax(gm, XLA_CFG)


def test_outputs_never_alias_inputs_and_int64_stays_int64():
    """clone() is the value itself in JAX: a returned input is copied so writing to it
    changes nothing else; int64 crosses DLPack as int64 (JAX's default would be int32)."""
    x = torch.randn(3, 4)
    idx = torch.tensor([2, 0], dtype=torch.int64)
    gm = make_fx(lambda x, i: (x.clone(), x[i], i * 3))(x, idx)
    clone, gathered, scaled = targets.backend("xla").compile(gm, [x, idx], XLA_CFG)(x, idx)
    assert_same_outputs((x, x[idx], idx * 3), (clone, gathered, scaled))
    assert clone.data_ptr() != x.data_ptr() and scaled.dtype == torch.int64
    clone.add_(1)
    assert not torch.equal(clone, x)


def test_an_output_that_is_a_constant_is_a_tensor_of_its_own():
    """Writing to it must not change the constant the next call returns."""
    w, x = torch.randn(3), torch.randn(3)
    gm = make_fx(lambda x: (x + 1, w))(x)
    compiled = targets.backend("xla").compile(gm, [x], XLA_CFG)
    _, first = compiled(x)
    first.add_(100)
    assert torch.equal(compiled(x)[1], w)


def test_non_contiguous_inputs():
    model = MLP().eval()
    compiled = graphopt.optimize(model, (torch.randn(4, 32),), target="xla")
    x = torch.randn(32, 4).t()
    with torch.no_grad():
        assert_same_outputs(model(x), compiled(x))


# ---------------------------------------------------------------------------- artifacts

PLAIN_JAX = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from jax import export
    from safetensors.numpy import load_file
    folder = sys.argv[1]
    manifest = json.load(open(f"{folder}/manifest.json"))
    section = manifest["stablehlo"]
    exported = export.deserialize(bytearray(open(f"{folder}/model.stablehlo", "rb").read()))
    weights = load_file(f"{folder}/{section['weights_file']}")
    x = np.load(sys.argv[2])
    with jax.enable_x64(True):
        (out,) = exported.call(*[weights[k] for k in section["weights"]], x)
    np.save(sys.argv[3], np.asarray(out))
    assert "graphopt" not in sys.modules
    print(json.dumps(list(exported.platforms)))
    """
)


def test_stablehlo_artifact_with_a_dynamic_batch_runs_in_plain_jax(tmp_path):
    model = ResidualCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    batch = torch.export.Dim("batch", min=1, max=64)
    out = tmp_path / "cnn"
    exported = graphopt.export(model, (x,), out, format="stablehlo", dynamic_shapes=({0: batch},))
    assert {"model.stablehlo", "model.mlir", "weights.safetensors"} <= set(
        exported.manifest["files"]
    )
    assert exported.manifest["stablehlo"]["platforms"] == ["cpu", "tpu"]
    assert exported.manifest["inputs"][0]["shape"][0] == "batch"
    assert "tensor<?x3x16x16xf32>" in (out / "model.mlir").read_text()  # the batch stays symbolic
    # a batch size the export never saw, in a process that never imports graphopt
    x5 = torch.randn(5, 3, 16, 16)
    np.save(tmp_path / "x.npy", x5.numpy())
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_JAX)
    run = subprocess.run(
        [sys.executable, str(script), str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == ["cpu", "tpu"]  # lowered for TPU
    with torch.no_grad():
        assert_same_outputs(model(x5), torch.from_numpy(np.load(tmp_path / "y.npy")))
        assert_same_outputs(model(x5), graphopt.load(out)(x5))


def test_int8_stablehlo_artifact_matches_the_in_process_graph(tmp_path):
    model = ResidualCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    options = {"quantize": "int8", "calibration": calibration}
    graphopt.export(model, (x,), tmp_path / "q", format="stablehlo", platforms=["cpu"], **options)
    in_process = graphopt.optimize(model, (x,), target="xla", **options)
    with torch.no_grad():
        assert torch.equal(graphopt.load(tmp_path / "q")(x), in_process(x))
    assert "xi32>" in (tmp_path / "q" / "model.mlir").read_text()  # integer accumulation


def test_bert_stablehlo_artifact_takes_int64_token_ids(tmp_path):
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 12))
    exported = graphopt.export(model, (ids,), tmp_path / "bert", format="stablehlo")
    assert exported.manifest["verification"]["relative_error_vs_eager"] < 1e-5
    with torch.no_grad():
        got = graphopt.load(tmp_path / "bert")(ids)
        assert_same_outputs(model(ids).last_hidden_state, got.last_hidden_state)


def test_weight_only_stablehlo_artifact_keeps_the_weights_4_bit(tmp_path):
    """The artifact's linear weights are the packed 4-bit bytes (uint8), widened inside the
    program; it runs in plain JAX as the in-process graph does."""
    llama = tiny_llama(use_cache=False).eval()
    tokens = torch.randint(0, 128, (2, 16))
    options = {"quantize": "int4_weight_only", "group_size": 32}
    graphopt.export(llama, (tokens,), tmp_path / "f", format="stablehlo", platforms=["cpu"])
    graphopt.export(llama, (tokens,), tmp_path / "q", format="stablehlo", platforms=["cpu"],
                    **options)  # fmt: skip
    from safetensors.numpy import load_file

    weights = load_file(tmp_path / "q" / "weights.safetensors")
    assert sum(w.dtype == np.uint8 for w in weights.values()) == 15  # the linear layers
    size = {name: (tmp_path / name / "weights.safetensors").stat().st_size for name in "fq"}
    assert size["q"] < 0.35 * size["f"]
    in_process = graphopt.optimize(llama, (tokens,), target="xla", **options)
    with torch.no_grad():
        got = graphopt.load(tmp_path / "q")(tokens).logits
        assert relative_error(in_process(tokens).logits, got) < 1e-6


@pytest.mark.parametrize("platforms", [("gpu",), (), "cpu,tpu"])
def test_bad_platforms_are_refused_with_the_accepted_values(tmp_path, platforms):
    with pytest.raises(ValueError, match="accepted values.*'cpu', 'tpu'"):
        graphopt.export(MLP().eval(), (torch.randn(2, 32),), tmp_path / "m",
                        format="stablehlo", platforms=platforms)  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_platforms_belong_to_stablehlo_only(tmp_path):
    with pytest.raises(ValueError, match="platforms applies to format='stablehlo' only"):
        graphopt.export(MLP().eval(), (torch.randn(2, 32),), tmp_path / "m", format="onnx",
                        platforms=["cpu"])  # fmt: skip


def test_export_with_an_unsupported_op_writes_nothing(tmp_path):
    with pytest.raises(UnsupportedOpError, match="fft"):
        graphopt.export(SpectralHead().eval(), (torch.randn(3, 16),), tmp_path / "s",
                        format="stablehlo")  # fmt: skip
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())
