"""graphopt.optimize (the torch.export path), verify=True, GRAPHOPT_DUMP and the entry point."""

import subprocess
import sys

import pytest
import torch

import graphopt
from graphopt import pipeline
from graphopt.passes.base import PassResult, get_attr_value
from graphopt.testing import assert_same_outputs
from tests.models import MLP, ResidualCNN


def test_optimize_returns_module_with_report():
    model = ResidualCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    optimized = graphopt.optimize(model, (x,))
    assert_same_outputs(model(x), optimized(x))
    report = optimized.report
    names = [p.name for p in report.passes]
    assert names[:3] == ["decompose_fused_ops", "remove_noops", "fold_batchnorm"]
    assert report.params_before > report.params_after > 0, "BN parameters were folded away"
    assert report.flops_before > 0
    text = str(report)
    for name in names:
        assert name in text
    assert "inductor" in text


def test_optimize_dynamic_batch():
    model = MLP().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    optimized = graphopt.optimize(model, (torch.randn(4, 32),), dynamic_shapes=({0: batch},))
    for n in (1, 3, 17):
        x = torch.randn(n, 32)
        assert_same_outputs(model(x), optimized(x))


def test_optimize_rejects_training_mode_batchnorm():
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        graphopt.optimize(ResidualCNN().train(), (torch.randn(2, 3, 16, 16),))


def _corrupt_weights(gm, cfg):
    """A deliberately wrong pass: scales the first constant the graph uses."""
    node = next(n for n in gm.graph.nodes if n.op == "get_attr")
    get_attr_value(gm, node).mul_(1.5)
    return PassResult(gm, True, {"corrupted": 1})


def test_verify_names_the_pass_that_changed_the_numbers(monkeypatch):
    bad = pipeline.Step("corrupt_weights", _corrupt_weights, "test only", training=False)
    monkeypatch.setattr(pipeline, "PIPELINE", [*pipeline.PIPELINE[:2], bad, *pipeline.PIPELINE[2:]])
    with pytest.raises(graphopt.VerificationError, match="'corrupt_weights' changed the outputs"):
        graphopt.optimize(MLP().eval(), (torch.randn(2, 32),), verify=True)


def test_verify_under_torch_compile_names_the_pass(monkeypatch):
    bad = pipeline.Step("corrupt_weights", _corrupt_weights, "test only", training=False)
    monkeypatch.setattr(pipeline, "PIPELINE", [bad, *pipeline.PIPELINE])
    compiled = torch.compile(MLP().eval(), backend="graphopt", options={"verify": True})
    with pytest.raises(Exception, match="'corrupt_weights' changed the outputs"), torch.no_grad():
        compiled(torch.randn(2, 32))


def test_verify_runs_int8_kernels_against_the_int8_graph_only(monkeypatch):
    from graphopt import compiler

    references = []  # the graphs compile_graph runs as the lowering's reference

    def run_graph(gm, inputs):
        references.append("graphopt.quantization" in gm.meta)
        return pipeline.run_graph(gm, inputs)

    monkeypatch.setattr(compiler, "run_graph", run_graph)
    calibration = [(torch.randn(4, 32),) for _ in range(2)]
    model = graphopt.optimize(
        MLP().eval(), (torch.randn(4, 32),), quantize="int8", calibration=calibration, verify=True
    )
    assert model.report.verified
    assert references == [True]  # no float run whose outputs would be thrown away


def test_disable_passes_skips_them():
    optimized = graphopt.optimize(
        ResidualCNN().eval(), (torch.randn(1, 3, 16, 16),), disable_passes=["fold_batchnorm"]
    )
    assert "fold_batchnorm" not in [p.name for p in optimized.report.passes]


def test_dump_writes_graph_after_each_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DUMP", str(tmp_path))
    optimized = graphopt.optimize(MLP().eval(), (torch.randn(2, 32),))
    files = sorted(p.name for p in (tmp_path / optimized.report.graph_id).iterdir())
    assert files[0] == "00_captured.txt"
    assert any(f.endswith("_fold_constants.txt") for f in files)
    # every pass that runs for these options (quantize only runs with quantize="int8")
    assert len(files) == 1 + len([s for s in pipeline.PIPELINE if s.applies is None])


def test_entry_point_registers_backend_without_import():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Linear(4, 2).eval()\n"
        "f = torch.compile(m, backend='graphopt')\n"
        "x = torch.randn(3, 4)\n"
        "with torch.no_grad(): torch.testing.assert_close(f(x), m(x))\n"
        "assert 'graphopt' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_aarch64_has_no_runtime_here_and_says_so():
    says = r"target='aarch64'.*graphopt.export\(.*format='tvm', target='aarch64'\)"
    with pytest.raises(NotImplementedError, match=says):
        graphopt.optimize(MLP().eval(), (torch.randn(2, 32),), target="aarch64")


def test_hls_without_int8_is_refused():
    with pytest.raises(ValueError, match=r"target='hls' \(FPGAs.*integer-only.*quantize='int8'"):
        graphopt.optimize(MLP().eval(), (torch.randn(2, 32),), target="hls")


def _tvm_sees_a_gpu() -> bool:
    import tvm

    return tvm.cuda(0).exist


@pytest.mark.skipif(_tvm_sees_a_gpu(), reason="a GPU is visible: target='cuda' runs there")
def test_cuda_without_a_gpu_is_a_clear_compile_time_error():
    compiled = torch.compile(MLP().eval(), backend="graphopt", options={"target": "cuda"})
    with pytest.raises(Exception, match="target='cuda' needs a CUDA GPU visible to TVM"):
        with torch.no_grad():
            compiled(torch.randn(2, 32))
