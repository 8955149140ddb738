"""Quantized linear layers (weight-only int8/int4, dynamic int8) and int8 embedding tables:
kernels, packing, pass, swap."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import graphopt
from graphopt import quantized_linear
from graphopt.backends.inductor import tile_int8_weights
from graphopt.testing import assert_same_outputs, relative_error
from tests.models import tiny_decoder

SHAPES = [(1, 64, 40), (3, 128, 33), (8, 256, 64), (9, 128, 20), (40, 256, 300)]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert quantized_linear.load_kernels(), "the C++ kernels must build here (g++ is a CI tool)"


def _reference_and_kernel(op_name: str, *args):
    reference = getattr(quantized_linear, f"_{op_name.replace('_weight', '')}_reference")(*args)
    return reference, getattr(torch.ops.graphopt, op_name)(*args)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_int8_kernel_matches_reference(m, k, n, bias):
    """Batches up to 8 take the GEMV kernel, larger ones dequantize blocks for the GEMM."""
    x, w = torch.randn(m, k), torch.randn(n, k)
    q, scale = quantized_linear.quantize_int8(w)
    b = torch.randn(n) if bias else None
    expected, got = _reference_and_kernel("linear_int8_weight", x, q, scale, b)
    assert_same_outputs(expected, got)
    simulated = quantized_linear._linear_int8_reference(x, q, scale, None)
    assert relative_error(x @ w.T, simulated) < 0.02


TILED_SHAPES = [(1, 64, 4), (2, 128, 40), (3, 192, 8), (4, 64, 68), (7, 128, 12), (33, 256, 24)]


@pytest.mark.parametrize(("m", "k", "n"), TILED_SHAPES)
def test_tiled_int8_kernel_matches_the_row_layout(m, k, n):
    """The tiled layout gives the [N, K] layout's outputs: x rows by fours over the tiles
    (1..4, 7 = 4 + 3), and the dequantizing GEMM above 32 rows."""
    x, w = torch.randn(m, k), torch.randn(n, k)
    q, scale = quantized_linear.quantize_int8(w)
    tiles = quantized_linear.tile_int8(q)
    assert tiles.shape == (n // 4, k // 64, 4, 64)
    assert torch.equal(quantized_linear.untile_int8(tiles), q)
    assert torch.equal(tiles[1, 0, 2], q[6, :64]) if n >= 8 else True
    b = torch.randn(n)
    expected = quantized_linear._linear_int8_reference(x, q, scale, b)
    assert_same_outputs(expected, torch.ops.graphopt.linear_int8_weight(x, tiles, scale, b))
    assert_same_outputs(expected, quantized_linear._linear_int8_reference(x, tiles, scale, b))


def test_tiled_int8_kernel_rejects_other_4d_shapes():
    with pytest.raises(RuntimeError, match=r"\[N/4, K/64, 4, 64\]"):
        torch.ops.graphopt.linear_int8_weight(
            torch.randn(1, 64), torch.zeros(2, 2, 2, 16, dtype=torch.int8), torch.ones(4), None
        )


def test_tile_int8_weights_rewrites_the_graph_and_frees_the_row_layout():
    """What the x86 lowering does: each tileable int8 weight replaced by its tiles (a weight
    two calls read, once), the [N, K] copy dropped, an untileable one left as it is."""
    import torch.fx

    from graphopt.passes.base import add_constant

    op = torch.ops.graphopt.linear_int8_weight.default
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    x = gm.graph.placeholder("x")
    weights = {}
    for name, n in (("shared", 8), ("odd", 6)):
        q, s = quantized_linear.quantize_int8(torch.randn(n, 64))
        weights[name] = (q, s)
        w_node = gm.graph.get_attr(add_constant(gm, q, name))
        s_node = gm.graph.get_attr(add_constant(gm, s, f"{name}_scale"))
        weights[name] += (w_node, s_node)
    q, s, w_node, s_node = weights["shared"]
    y1 = gm.graph.call_function(op, (x, w_node, s_node, None))
    y2 = gm.graph.call_function(op, (x, w_node, s_node, None))
    y3 = gm.graph.call_function(op, (x, weights["odd"][2], weights["odd"][3], None))
    gm.graph.output((y1, y2, y3))
    gm.recompile()
    inputs = torch.randn(3, 64)
    expected = gm(inputs)
    assert tile_int8_weights(gm) == 1
    buffers = dict(gm.named_buffers())
    assert "_graphopt_shared" not in buffers and "_graphopt_odd" in buffers
    assert [b.dim() for name, b in buffers.items() if b.dtype == torch.int8] == [2, 4]
    assert_same_outputs(expected, gm(inputs))


@pytest.mark.parametrize("group", quantized_linear.GROUP_SIZES)
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_int4_kernel_matches_reference(m, k, n, group):
    if k % group:
        pytest.skip("input channels not whole groups")
    x, w = torch.randn(m, k), torch.randn(n, k)
    packed, scale, zero = quantized_linear.quantize_int4(w, group)
    expected, got = _reference_and_kernel(
        "linear_int4_weight", x, packed, scale, zero, group, torch.randn(n)
    )
    assert_same_outputs(expected, got)


def test_kernels_take_any_leading_dims_and_strides():
    x = torch.randn(2, 5, 64).transpose(0, 1)  # not contiguous
    w = torch.randn(48, 64)
    q, scale = quantized_linear.quantize_int8(w)
    expected, got = _reference_and_kernel("linear_int8_weight", x, q, scale, None)
    assert got.shape == (5, 2, 48)
    assert_same_outputs(expected, got)


def test_int4_quantization_is_within_half_a_step():
    w = torch.randn(16, 256) * torch.logspace(-2, 1, 16)[:, None]
    packed, scale, zero = quantized_linear.quantize_int4(w, 64)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 128)
    restored = quantized_linear.dequantize_int4(packed, scale, zero, 64)
    step = scale.repeat_interleave(64, dim=1)
    assert ((restored - w).abs() <= step / 2 + 1e-6).all()
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    assert torch.equal(quantized_linear.unpack_int4(quantized_linear.pack_int4(q)), q)


def test_int4_rejects_partial_groups():
    with pytest.raises(ValueError, match=r"96 channels, group_size 64.*\[32, 64, 128\]"):
        quantized_linear.quantize_int4(torch.randn(4, 96), 64)


def test_without_a_compiler_the_ops_run_their_reference(tmp_path):
    code = (
        "import torch, graphopt.quantized_linear as w\n"
        "assert not w.load_kernels()\n"
        "x, q, s = torch.randn(2, 8), torch.randint(-9, 9, (4, 8), dtype=torch.int8), "
        "torch.rand(4)\n"
        "torch.testing.assert_close(torch.ops.graphopt.linear_int8_weight(x, q, s, None), "
        "x @ (q.float() * s[:, None]).T)\n"
    )
    env = {"CXX": str(tmp_path / "no-such-compiler"), "GRAPHOPT_KERNEL_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**_env(), **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no C++ compiler" in done.stderr


def _env():
    import os

    return dict(os.environ)


@pytest.mark.parametrize(
    ("mode", "limit", "smaller"), [("int8_weight_only", 0.02, 3.5), ("int4_weight_only", 0.2, 5)]
)
def test_pass_quantizes_every_linear_of_a_decoder(mode, limit, smaller):
    model = tiny_decoder("llama", use_cache=False)
    ids = torch.randint(1, 128, (1, 16))
    optimized = graphopt.optimize(model, (ids,), quantize=mode, group_size=32)
    with torch.no_grad():
        expected, got = model(ids).logits, optimized(ids).logits
    assert relative_error(expected, got) < limit
    summary = optimized.report.quantization
    assert len(summary.layers) == 16 and not summary.kept_float  # 7 per layer, lm_head, table
    assert summary.layers[-1].shape == (128, 64)  # the embedding table
    assert summary.float_bytes / summary.quantized_bytes > smaller
    (partition,) = optimized.report.partitions
    assert partition.target == "inductor" and not optimized.report.fallbacks
    op = f"graphopt.linear_{'int8' if mode.startswith('int8') else 'int4'}_weight.default"
    assert partition.ops[op] == 15
    assert not {"aten.mm.default", "aten.addmm.default"} & set(partition.ops)
    assert mode in str(optimized.report)
    assert not [
        n
        for n, t in optimized.graph_module.named_buffers()
        if t.dtype == torch.float32 and t.numel() >= 64 * 64
    ], "a float weight or table was kept"


def test_int4_keeps_layers_with_partial_groups_in_float():
    model = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(2, 96)
    optimized = graphopt.optimize(model.eval(), (x,), quantize="int4_weight_only", group_size=64)
    summary = optimized.report.quantization
    assert len(summary.layers) == 1 and "96 input channels" in summary.kept_float[0]
    with torch.no_grad():
        assert relative_error(model(x), optimized(x)) < 0.2


def _model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors, a tensor shared by two layers counted once."""
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in unique)


def test_module_swap_drops_the_float_weights_and_compiles():
    model = tiny_decoder("qwen2")
    ids = torch.randint(1, 128, (1, 9))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    before = _model_bytes(model)
    summary = graphopt.quantize_weights_(model, "int8_weight_only")
    after = _model_bytes(model)
    assert len(summary.layers) == 16  # 15 linear layers and the embedding table
    assert before - after == summary.float_bytes - summary.quantized_bytes
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in model.modules())
    layers = [m for m in model.modules() if isinstance(m, quantized_linear.QuantizedLinear)]
    assert all(m.weight.dim() == 4 for m in layers)  # every shape here tiles
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=6, do_sample=False)
        model.forward = torch.compile(model.forward, backend="graphopt")
        compiled = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(eager, compiled)
    assert (eager[0, :10] == expected[0, :10]).float().mean() > 0.8  # int8 barely moves greedy


def test_bad_options_name_the_accepted_values():
    with pytest.raises(ValueError, match=r"'group_size' got 100; accepted values: \[32, 64, 128\]"):
        graphopt.Config(quantize="int4_weight_only", group_size=100)
    with pytest.raises(ValueError, match="int4_weight_only"):
        graphopt.Config(quantize="int3")
    with pytest.raises(ValueError, match="accepted values"):
        graphopt.quantize_weights_(torch.nn.Linear(4, 4), "int2_weight_only")


def test_the_quantize_option_under_torch_compile_tiles_the_weights_it_made():
    """The x86 lowering tiles the int8 constants the pass made (real tensors, inside the fake
    mode of torch.compile) and the graph compiles with no fallback."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(3, 64)
    compiled = torch.compile(
        model.eval(), backend="graphopt", options={"quantize": "int8_weight_only"}
    )
    with torch.no_grad():
        got = compiled(x)
    report = graphopt.reports()[-1]
    assert not report.fallbacks and [p.target for p in report.partitions] == ["inductor"]
    reference = torch.nn.Sequential(*model)
    graphopt.quantize_weights_(reference, "int8_weight_only")
    with torch.no_grad():
        assert_same_outputs(reference(x), got)


def test_only_int8_weight_only_tiles_and_odd_shapes_keep_rows():
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(8, 6))
    graphopt.quantize_weights_(model, "int8_weight_only")
    assert [model[0].weight.dim(), model[1].weight.dim()] == [4, 2]  # [6, 8] does not tile
    dynamic = torch.nn.Sequential(torch.nn.Linear(64, 8))
    graphopt.quantize_weights_(dynamic, "int8_dynamic")
    assert dynamic[0].weight.dim() == 2  # torch._int_mm reads [N, K]


def test_dynamic_int8_multiplies_in_integers():
    """Each row of x gets its own scale; the products are summed exactly (int32)."""
    x = torch.randn(5, 96) * torch.logspace(-1, 1, 5)[:, None]
    w = torch.randn(24, 96)
    q, scale = quantized_linear.quantize_int8(w)
    act_mul = torch.rand(96) + 0.5
    got = torch.ops.graphopt.linear_int8_dynamic(x, q, scale, act_mul, None)
    xs = (x * act_mul).double()
    row = xs.abs().amax(1, keepdim=True) / 127
    qx = torch.round(xs / row).clamp(-127, 127)
    expected = (qx @ q.double().T) * row * scale.double()
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)
    assert relative_error((x * act_mul) @ w.T, got) < 0.02


def test_dynamic_int8_stays_on_int_mm():
    """Inductor's freezing must not turn int8_dynamic's decomposition into oneDNN's qlinear
    (torchao's SmoothQuant pattern), which runs it orders of magnitude slower on some CPUs:
    inductor lowers the `_int_mm` (its lowering counts each) and matches no qlinear pattern."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    model = torch.nn.Sequential(torch.nn.Linear(64, 48)).eval()
    graphopt.quantize_weights_(model, "int8_dynamic")
    x = torch.randn(32, 64)
    counters.clear()
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):
        got = torch.compile(model, backend="graphopt")(x)
        expected = model(x)
    assert any(key.startswith("aten._int_mm") for key in counters["aten_mm_info"])
    assert not [key for key in counters["inductor"] if "qlinear" in key]
    assert_same_outputs(expected, got)


def test_dynamic_int8_through_torch_compile_and_smoothquant():
    model = tiny_decoder("llama", use_cache=False)
    ids = torch.randint(1, 128, (2, 16))
    calibration = [(torch.randint(1, 128, (2, 16)),) for _ in range(2)]
    with torch.no_grad():
        expected = model(ids).logits
        plain = graphopt.optimize(model, (ids,), quantize="int8_dynamic")
        smooth = graphopt.optimize(
            model, (ids,), quantize="int8_dynamic", smoothquant=0.5, calibration=calibration
        )
        for optimized in (plain, smooth):
            assert relative_error(expected, optimized(ids).logits) < 0.05
            assert len(optimized.report.quantization.layers) == 16  # o_proj too, at batch 2
        assert "SmoothQuant alpha 0.5" in str(smooth.report)
        compiled = torch.compile(model, backend="graphopt", options={"quantize": "int8_dynamic"})
        assert relative_error(expected, compiled(ids).logits) < 0.05


def test_smoothquant_option_is_checked():
    with pytest.raises(ValueError, match=r"'smoothquant'.*\[0, 1\].*int8_dynamic"):
        graphopt.Config(quantize="int8_weight_only", smoothquant=0.5)
    with pytest.raises(ValueError, match=r"'smoothquant'"):
        graphopt.Config(quantize="int8_dynamic", smoothquant=1.5)
    assert graphopt.Config(quantize="int8_dynamic", smoothquant=0.5).needs_calibration
    assert not graphopt.Config(quantize="int8_dynamic").needs_calibration


def test_quantizing_in_row_blocks_is_quantizing_at_once(monkeypatch):
    """Large weights are quantized a few rows at a time (the temporaries stay small): every
    scale is per row or per group within one, so the result is the same."""
    w = torch.randn(37, 128)
    whole = {
        "int8_weight_only": dict(zip(("weight", "scale"), quantized_linear.quantize_int8(w))),
        "int4_weight_only": dict(
            zip(("weight", "scale", "zero"), quantized_linear.quantize_int4(w, 64))
        ),
    }
    monkeypatch.setattr(quantized_linear, "QUANTIZE_ROWS", 5)
    for mode, expected in whole.items():
        got = quantized_linear.quantize_linear_weight(w, mode, 64)
        assert {k: got[k] for k in expected}.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(got[name], value), (mode, name)


def test_gpt2_conv1d_layers_and_a_tied_table_are_quantized_once():
    """GPT-2's layers are transformers' Conv1D ([in, out] weights); its output layer shares the
    token table: one int8 copy serves both, and the summary counts it once."""
    model = tiny_decoder("gpt2")
    ids = torch.randint(1, 128, (1, 9))
    with torch.no_grad():
        expected = model(ids).logits
    before = _model_bytes(model)
    summary = graphopt.quantize_weights_(model, "int8_weight_only")
    table = model.get_input_embeddings()
    assert isinstance(table, quantized_linear.QuantizedEmbedding)
    assert model.lm_head.weight is table.weight and model.lm_head.scale is table.scale
    assert table.weight.dim() == 4  # in the kernels' tiled layout, which the lookup reads
    rows = quantized_linear.untile_int8(table.weight)
    assert torch.equal(table(ids), rows[ids].float() * table.scale[ids, None])
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    after = _model_bytes(model)
    assert before - after == summary.float_bytes - summary.quantized_bytes
    with torch.no_grad():
        got = model(ids).logits
        compiled = torch.compile(model, backend="graphopt")(ids).logits
    assert relative_error(expected, got) < 0.02
    assert_same_outputs(got, compiled)


def test_embedding_rows_are_exact_to_half_a_step_and_subclasses_stay_float():
    table = torch.nn.Embedding(50, 24)
    model = torch.nn.Sequential(table)
    ids = torch.randint(0, 50, (3, 7))
    expected = table(ids)
    summary = graphopt.quantize_weights_(model, "int4_weight_only", group_size=32)
    rows = model[0]
    step = rows.scale[ids].unsqueeze(-1)
    assert ((model(ids) - expected).abs() <= step / 2 + 1e-7).all()
    assert len(summary.layers) == 1

    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2

    scaled = torch.nn.Sequential(Scaled(50, 24))
    summary = graphopt.quantize_weights_(scaled, "int8_weight_only")
    assert (
        not summary.layers and "0 (Scaled: not a plain nn.Embedding lookup)" in summary.kept_float
    )
    assert (
        graphopt.quantize_weights_(
            torch.nn.Sequential(torch.nn.Embedding(50, 24)), embeddings=False
        ).layers
        == []
    )


def test_a_bare_layer_is_refused_with_what_to_do():
    with pytest.raises(TypeError, match="wrap it in a module"):
        graphopt.quantize_weights_(torch.nn.Linear(4, 4))


def test_a_tied_table_before_an_int4_output_layer_stays_int8_rows():
    class Tied(torch.nn.Module):  # the output layer comes first in named_modules()
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(64, 40, bias=False)
            self.table = torch.nn.Embedding(40, 64)
            self.head.weight = self.table.weight

        def forward(self, ids):
            return self.head(self.table(ids))

    model = Tied()
    ids = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        expected = model(ids)
    graphopt.quantize_weights_(model, "int4_weight_only", group_size=32)
    assert model.table.weight.dtype == torch.int8 and model.head.weight.dtype == torch.uint8
    with torch.no_grad():
        assert relative_error(expected, model(ids)) < 0.2
