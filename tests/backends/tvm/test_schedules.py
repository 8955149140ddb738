"""The default CPU schedules (`backends/tvm/schedules.py`): which kernels get which schedule,
and that compiled models still match eager. Their speed is measured by benchmarks/, not here."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import tvm

from graphopt.backends.tvm import lower, schedules, tune
from graphopt.capture import capture_export
from graphopt.config import Config
from tests.models import DepthwiseSeparable, ResidualCNN, tiny_bert

LLVM = Config(target="llvm")
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})


def _kernels(model: nn.Module, inputs: tuple) -> dict[str, tvm.tirx.PrimFunc]:
    """The model's fused kernels after the default CPU rules, by name."""
    captured = capture_export(model.eval(), inputs)
    mod = lower.optimize_relax(lower.build_relax(captured.gm, inputs, LLVM), AVX2)
    with AVX2:
        mod = tvm.s_tir.dlight.ApplyDefaultSchedule(*schedules.cpu_rules(AVX2))(mod)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_convs_and_matmuls_get_register_tiles_run_in_parallel():
    torch.manual_seed(0)
    cnn = _kernels(ResidualCNN(), (torch.randn(1, 3, 32, 32),))
    bert = _kernels(tiny_bert(), (torch.randint(0, 100, (1, 16)),))
    convs = {n: f.script() for n, f in cnn.items() if "conv2d" in n}
    matmuls = {  # the 16-token ones (the pooler's 1-row matmul is too small to tile)
        n: f.script()
        for n, f in bert.items()
        if "matmul" in n and 16 in [int(d) for d in f.params[0].ty.shape]
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
    with lower.collect_kernels() as mods:
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
