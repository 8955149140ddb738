"""The default CPU schedules (`graphopt/backends/tvm/schedules.py`): which kernels get which
schedule, and that compiled models still match eager. Their speed is measured by benchmarks/,
not here."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import tvm

from graphopt.backends.tvm import build, schedules, tune
from graphopt.backends.tvm.translate import build_relax
from graphopt.capture import capture_export
from graphopt.config import Config
from tests.models import DepthwiseSeparable, ResidualCNN, tiny_bert

LLVM = Config(target="llvm")
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})


def _scheduled(model: nn.Module, inputs: tuple) -> tvm.IRModule:
    """The model's Relax module as compiled untuned: every kernel default-scheduled."""
    captured = capture_export(model.eval(), inputs)
    mod = build.optimize_relax(build_relax(captured.gm, inputs, LLVM), AVX2)
    return build.schedule_relax(mod, AVX2, None)[0]


def _kernels(model: nn.Module, inputs: tuple) -> dict[str, tvm.tirx.PrimFunc]:
    """The model's fused kernels after the default CPU rules, by name."""
    mod = _scheduled(model, inputs)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _shape(param: tvm.ir.Var) -> list[int]:
    return [int(d) for d in param.ty.shape]


def test_convs_and_matmuls_get_register_tiles_run_in_parallel():
    torch.manual_seed(0)
    cnn = _kernels(ResidualCNN(), (torch.randn(1, 3, 32, 32),))
    bert = _kernels(tiny_bert(), (torch.randint(0, 100, (1, 16)),))
    convs = {n: f.script() for n, f in cnn.items() if "conv2d" in n}
    matmuls = {  # the 16-token ones (the pooler's 1-row matmul is too small to tile)
        n: f.script() for n, f in bert.items() if "matmul" in n and 16 in _shape(f.params[0])
    }
    assert len(convs) >= 4 and len(matmuls) >= 3, (sorted(cnn), sorted(bert))
    for name, script in {**convs, **matmuls}.items():
        assert "tirx.is_scheduled" in script, name
        assert "T.parallel(" in script and "T.vectorized(" in script, name
        assert 'scope="local"' in script, f"{name}: no local accumulator tile"
        assert "T.unroll(" in script, f"{name}: one output row/channel per loaded vector"


def test_elementwise_kernels_are_parallel_and_vectorized_but_pooling_is_not_scheduled():
    torch.manual_seed(0)
    kernels = _kernels(tiny_bert(), (torch.randint(0, 100, (1, 16)),))
    elementwise = [f.script() for n, f in kernels.items() if n.startswith("fused_reshape")]
    assert elementwise and all("T.vectorized(" in s for s in elementwise)

    cnn = _kernels(ResidualCNN(), (torch.randn(1, 3, 32, 32),))
    pools = [f for n, f in cnn.items() if "max_pool" in n]
    assert pools and all("tirx.is_scheduled" not in f.script() for f in pools)


def test_depthwise_convs_are_claimed_and_left_as_written():
    """MobileNetV2's depthwise convs ran 2-5x slower tiled than as written (MIN_REDUCTION)."""
    torch.manual_seed(0)
    kernels = _kernels(DepthwiseSeparable(), (torch.randn(1, 16, 14, 14),))
    depthwise = [f.script() for n, f in kernels.items() if "conv2d1" in n]
    assert len(depthwise) == 1
    assert "tirx.is_scheduled" in depthwise[0]
    assert "T.parallel(" not in depthwise[0] and "T.vectorized(" not in depthwise[0]


@pytest.mark.parametrize(
    ("target", "lanes"),
    [
        ({"kind": "llvm", "mcpu": "znver3"}, 8),
        ({"kind": "llvm", "mcpu": "skylake-avx512"}, 16),
        ({"kind": "llvm", "mcpu": "x86-64"}, 4),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, 4),
    ],
)
def test_float32_vector_lanes_follow_the_cpu(target, lanes):
    assert schedules._vector_lanes(tvm.target.Target(target), 32) == lanes


def test_sve_targets_keep_llvm_scalable_vectorization():
    sve = tvm.target.Target(
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+sve"]}
    )
    assert schedules.cpu_rules(sve) == ()
    assert schedules.cpu_rules(AVX2) == schedules.DEFAULT_CPU_RULES


def test_compiling_leaves_the_kernels_handed_to_tuning_unscheduled(tvm_matches):
    """dlight's pass replaces functions in the module it is given: the build schedules a copy."""
    torch.manual_seed(0)
    model, x = ResidualCNN().eval(), torch.randn(1, 3, 32, 32)
    captured = capture_export(model, (x,))
    with build.collect_kernels() as mods:
        tvm_matches(captured.gm, captured.example_inputs, model(x))
    assert len(mods) == 1
    kernels, scheduled = tune.count_scheduled(mods[0])
    assert kernels > 5 and scheduled == 0


def test_a_prime_output_width_is_computed_padded_to_whole_vectors(tvm_matches):
    """GPT-2's 50257-word head: no divisor of 50257 fills a vector; the matmul runs padded."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(24, 37), nn.GELU()).eval(), torch.randn(16, 24)
    (script,) = [f.script() for n, f in _kernels(model, (x,)).items() if "matmul" in n]
    assert "_pad = T.sblock_alloc_buffer" in script and "T.vectorized(T.int64(8))" in script
    captured = capture_export(model, (x,))
    tvm_matches(captured.gm, captured.example_inputs, model(x))


def test_constant_weights_are_read_packed_and_packed_once_at_compile_time(tvm_matches):
    """A conv's or dense layer's constant weight is laid out as the tile reads it (output
    channels innermost, one contiguous vector per load); the repacking runs at compile time:
    no kernel, and nothing `main` calls, repacks a weight."""
    torch.manual_seed(0)
    cnn, x = ResidualCNN().eval(), torch.randn(1, 3, 32, 32)
    bert, ids = tiny_bert().eval(), torch.randint(0, 100, (1, 16))
    for model, inputs, op in ((cnn, (x,), "conv2d"), (bert, (ids,), "matmul")):
        mod = _scheduled(model, inputs)
        names = [gv.name_hint for gv in mod.functions]
        assert not any(n.endswith("_weight_prepack") for n in names), names
        assert "layout_rewrite_preproc" not in mod.script()
        packed = {n: f for n, f in mod.functions_items() if n.name_hint.endswith("_prepacked")}
        assert any(op in n.name_hint for n in packed), names
        for f in packed.values():
            assert any(_shape(p)[-1] in (8, 16) and len(_shape(p)) >= 3 for p in f.params)
        captured = capture_export(model, inputs)
        tvm_matches(captured.gm, captured.example_inputs, model(*inputs))


def test_packed_tiles_take_the_most_accumulators_then_the_most_vectors():
    # 3 vectors x 4 rows = 12 accumulators, over 2 x 4 and 1 x 8 (BERT's 128 tokens)
    assert schedules._packed_tile_vectors(96, 128) == 3
    # 56 columns (ResNet-18's first stage; 8 vectors): 2 x 4 = 8 over 1 x 8 (3 does not divide 8)
    assert schedules._packed_tile_vectors(8, 56) == 2
    # a 7-wide conv output row: 1 vector x 7 columns, over 2 vectors x 1
    assert schedules._packed_tile_vectors(64, 7) == 1
    # 28 columns: 2 x 4 = 8 over 1 x 7; 5 vectors allow 1 only
    assert schedules._packed_tile_vectors(16, 28) == 2
    assert schedules._packed_tile_vectors(5, 28) == 1


def test_a_tile_of_several_vectors_is_one_vector_op_each(tvm_matches):
    """3 vectors of output channels by 4 rows: each vector is its own unrolled 8-lane op (one
    24-lane op is split badly by LLVM), read from a weight packed 3 x 8 per row."""
    torch.manual_seed(0)
    model, x = nn.Linear(32, 48).eval(), torch.randn(1, 12, 32)
    (name, kernel), *rest = [(n, f) for n, f in _kernels(model, (x,)).items() if "matmul" in n]
    assert not rest, (name, rest)
    script = kernel.script()
    assert "T.vectorized(T.int64(8))" in script and "T.unroll(T.int64(3))" in script, script
    assert "T.vectorized(T.int64(24))" not in script, script
    assert any(_shape(p)[-2:] == [3, 8] for p in kernel.params), [_shape(p) for p in kernel.params]
    captured = capture_export(model, (x,))
    tvm_matches(captured.gm, captured.example_inputs, model(x))


def test_a_weight_that_fails_to_pack_is_tiled_unpacked(monkeypatch, tvm_matches):
    torch.manual_seed(0)
    model, x = ResidualCNN().eval(), torch.randn(1, 3, 32, 32)
    monkeypatch.setattr(schedules, "_pack_weights", lambda sch: False)
    kernels = _kernels(model, (x,))
    convs = [f.script() for n, f in kernels.items() if "conv2d" in n]
    assert convs and not any(n.endswith("_prepacked") for n in kernels)
    for script in convs:
        assert 'scope="local"' in script and "T.parallel(" in script
    captured = capture_export(model, (x,))
    tvm_matches(captured.gm, captured.example_inputs, model(x))
