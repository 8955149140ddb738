"""target="cuda" on a real GPU: TVM with dlight schedules against eager, through torch.compile
and graphopt.optimize, with the model on the GPU and on the CPU. These run only where TVM sees
a CUDA GPU (needs_gpu); without one, test_optimize checks the clear compile-time error."""

import pytest
import torch

import graphopt
from graphopt.testing import assert_same_outputs
from tests.models import MLP, ResidualCNN, SpectralHead, TransformerBlock

pytestmark = pytest.mark.needs_gpu

MODELS = {
    "mlp": (MLP, (2, 32)),
    "cnn": (ResidualCNN, (2, 3, 16, 16)),
    "transformer": (TransformerBlock, (2, 8, 32)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_compile_on_the_gpu_matches_eager(name):
    make, shape = MODELS[name]
    model, x = make().eval().cuda(), torch.randn(shape, device="cuda")
    compiled = torch.compile(model, backend="graphopt", options={"target": "cuda"})
    with torch.no_grad():
        expected, got = model(x), compiled(x)
    assert got.device == x.device
    assert_same_outputs(expected, got)
    report = graphopt.reports()[-1]
    assert {p.target for p in report.partitions} == {"tvm-cuda"}, str(report)


def test_a_cpu_model_compiled_for_cuda_takes_and_returns_cpu_tensors():
    model, x = ResidualCNN().eval(), torch.randn(2, 3, 16, 16)
    optimized = graphopt.optimize(model, (x,), target="cuda")
    with torch.no_grad():
        got = optimized(x)
    assert got.device.type == "cpu"
    assert_same_outputs(model(x), got)


def test_an_op_tvm_lacks_runs_in_pytorch_on_the_gpu():
    """rfft has no TVM rule: it runs in PyTorch between two TVM partitions, all on the GPU."""
    model, x = SpectralHead().eval().cuda(), torch.randn(4, 16, device="cuda")
    compiled = torch.compile(model, backend="graphopt", options={"target": "cuda"})
    with torch.no_grad():
        expected, got = model(x), compiled(x)
    assert_same_outputs(expected, got)
    report = graphopt.reports()[-1]
    assert {p.target for p in report.partitions} == {"tvm-cuda", "torch"}
    assert any("fft" in f.op for f in report.fallbacks), str(report)


@pytest.mark.parametrize("devices", [["cpu", "cuda:0"], ["cuda:0", "cpu"], ["cuda", "cpu", "cuda"]])
def test_stages_over_cpu_and_gpu_match_eager(devices):
    """A CPU stage runs inductor's code, a GPU stage TVM's; values cross on each cut and the
    outputs come back to the CPU, where the model returns them."""
    model, x = ResidualCNN().eval(), torch.randn(4, 3, 32, 32)
    optimized = graphopt.optimize(model, (x,), devices=devices)
    with torch.no_grad():
        for y in (x, torch.randn(4, 3, 32, 32)):
            got = optimized(y)
            assert got.device.type == "cpu"
            assert_same_outputs(model(y), got)
    report = optimized.report
    stages = [p for p in report.partitions if p.name.startswith("stage")]
    assert [p.target for p in stages] == devices
    for stage, device in zip(stages, devices):
        backend = "tvm-cuda" if device.startswith("cuda") else "inductor"
        assert stage.note.startswith(backend), stage
    assert "tvm-cuda" in {p.target for p in report.partitions}, str(report)


def test_the_op_tvm_lacks_stays_on_the_cpu_stage():
    """devices=["cpu", "cuda:0"]: rfft (no TVM rule) must end the CPU stage, so the GPU stage
    is TVM alone; with the GPU first, the cut falls before rfft."""
    model, x = SpectralHead().eval(), torch.randn(4, 16)
    for devices in (["cpu", "cuda:0"], ["cuda:0", "cpu"]):
        optimized = graphopt.optimize(model, (x,), devices=devices)
        with torch.no_grad():
            assert_same_outputs(model(x), optimized(x))
        report = optimized.report
        assert "run in PyTorch" not in str(report.stages), report.stages
        assert not any(f.op.startswith("aten._fft") for f in report.fallbacks), str(report)


def test_a_gpu_only_split_runs_the_op_tvm_lacks_in_pytorch_on_the_gpu():
    model, x = SpectralHead().eval(), torch.randn(4, 16)
    optimized = graphopt.optimize(model, (x,), devices=["cuda:0"])
    with torch.no_grad():
        got = optimized(x)
    assert got.device.type == "cpu"
    assert_same_outputs(model(x), got)
    assert "run in PyTorch on cuda:0: aten._fft_r2c.default" in str(optimized.report.stages)
