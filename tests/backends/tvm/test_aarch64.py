"""target="aarch64" libraries run: exported with aarch64-linux-gnu-g++, run by tvm_runner under
qemu-aarch64-static, and compared with eager PyTorch.

Needs aarch64-linux-gnu-g++ and qemu-aarch64-static (Debian: g++-aarch64-linux-gnu,
qemu-user-static) and, once per test run, pip access to the aarch64 TVM wheels (the runner is
built into `$GRAPHOPT_RUNNER_DIR`, which tests/conftest.py points at the run's temp folder
unless it is set). Marked needs_qemu: tests/conftest.py skips them when the tools are missing,
unless GRAPHOPT_REQUIRE_QEMU=1 (CI).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import tvm
from torch import nn

from graphopt.backends.tvm import aarch64 as arm
from graphopt.backends.tvm import build_relax, compile_relax
from graphopt.backends.tvm.aarch64 import build_runner, export_library, missing_tools, run_library
from graphopt.capture import capture_export
from graphopt.config import Config
from graphopt.testing import assert_same_outputs
from tests.backends.tvm.conftest import unsupported_nodes
from tests.models import MLP, Fn, ResidualCNN

AARCH64 = Config(target="aarch64")
SVE = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+sve"]}


@pytest.fixture(scope="session")
def runner_dir() -> Path:
    """tvm_runner for aarch64, built once per test run ($GRAPHOPT_RUNNER_DIR: see conftest)."""
    return build_runner(progress=None)


def _export(
    model: nn.Module, inputs: Sequence[torch.Tensor], path: Path, target: dict | None = None
) -> tvm.runtime.Module:
    """Capture `model`, compile it for aarch64 (or `target`) and export it to `path`; returns
    the compiled LLVM module (for inspecting its assembly)."""
    captured = capture_export(model.eval(), tuple(inputs))
    assert unsupported_nodes(captured.gm, AARCH64) == []
    mod = build_relax(captured.gm, captured.example_inputs, AARCH64)
    executable = compile_relax(mod, AARCH64, tvm.target.Target(target) if target else None)
    export_library(executable, path)
    return next(m for m in executable.mod.imports if m.kind == "llvm")


def _eager(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model.eval()(*inputs)
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def _run(library: Path, inputs: Sequence[torch.Tensor], **kwargs) -> tuple[torch.Tensor, ...]:
    return tuple(
        torch.from_numpy(o) for o in run_library(library, [x.numpy() for x in inputs], **kwargs)
    )


# built inside the test, after conftest seeds torch
MODELS = {
    "mlp": lambda: (MLP(d_in=32, hidden=64, d_out=10), (torch.randn(4, 32),)),
    "residual_cnn": lambda: (ResidualCNN(width=8), (torch.randn(2, 3, 16, 16),)),
}


@pytest.mark.needs_qemu
@pytest.mark.parametrize("name", list(MODELS))
def test_model_runs_under_qemu_and_matches_eager(name, runner_dir, tmp_path):
    model, inputs = MODELS[name]()
    library = tmp_path / "model.so"
    _export(model, inputs, library)
    assert_same_outputs(_eager(model, inputs), _run(library, inputs, runner_dir=runner_dir))


@pytest.mark.needs_qemu
def test_dtypes_and_scalars_round_trip(runner_dir, tmp_path):
    """int64/bool/float16/uint8 and 0-d inputs in, seven outputs of six dtypes out."""

    def fn(m, x, idx, mask, h, u, s):
        picked = torch.index_select(torch.where(mask, x, 0.0), 0, idx)
        return picked * s, idx * 2, ~mask, h * 2, x.sum(), (x > 0).to(torch.int8), u + 1

    model = Fn(fn)
    inputs = (
        torch.randn(5, 3),
        torch.tensor([4, 0, 2]),
        torch.rand(5, 3) > 0.5,
        torch.randn(5, 3).half(),
        torch.randint(0, 256, (2, 2), dtype=torch.uint8),
        torch.tensor(1.5),
    )
    library = tmp_path / "dtypes.so"
    _export(model, inputs, library)
    got = _run(library, inputs, runner_dir=runner_dir)
    assert [t.dtype for t in got] == [t.dtype for t in _eager(model, inputs)]
    assert got[4].shape == ()
    assert_same_outputs(_eager(model, inputs), got)


@pytest.mark.needs_qemu
def test_sve_library_needs_an_sve_core(runner_dir, tmp_path):
    model, inputs = MLP(d_in=32, hidden=64, d_out=10), (torch.randn(4, 32),)
    library = tmp_path / "mlp_sve.so"
    llvm = _export(model, inputs, library, SVE)
    assert re.search(r"\bz\d+\.[bhsd]\b", llvm.inspect_source("asm")), "no SVE instructions"

    # cortex-a72 is ARMv8.0 + NEON: the hwcap check refuses before the library is loaded ...
    with pytest.raises(RuntimeError, match="built for \\+sve but this CPU does not have sve"):
        _run(library, inputs, cpu="cortex-a72", require=["sve"], runner_dir=runner_dir)
    # ... and without it the first SVE instruction traps
    with pytest.raises(RuntimeError, match="illegal instruction: the library uses a CPU feature"):
        _run(library, inputs, cpu="cortex-a72", runner_dir=runner_dir)
    # qemu's "max" core has SVE
    got = _run(library, inputs, cpu="max", require=["sve"], runner_dir=runner_dir)
    assert_same_outputs(_eager(model, inputs), got)


@pytest.fixture(scope="module")
def mlp_library(tmp_path_factory) -> Path:
    """An exported aarch64 MLP: main takes one float32 (2, 8) input."""
    library = tmp_path_factory.mktemp("mlp") / "mlp.so"
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    _export(model, (torch.randn(2, 8),), library)
    return library


@pytest.mark.needs_qemu
@pytest.mark.parametrize(
    "inputs, message",
    [
        ([torch.randn(2, 8)] * 2, r"main takes 1 inputs \(input\) but 2 were given"),
        ([], r"main takes 1 inputs \(input\) but 0 were given"),
        ([torch.randn(3, 8)], r"shape\[0\] mismatch"),
        ([torch.randn(2, 8).double()], r"expect Tensor with dtype float32 but get float64"),
    ],
    ids=["too_many", "none", "shape", "dtype"],
)
def test_wrong_inputs_are_named(mlp_library, runner_dir, inputs, message):
    with pytest.raises(RuntimeError, match=message):
        _run(mlp_library, inputs, runner_dir=runner_dir)


@pytest.mark.needs_qemu
def test_missing_library_and_unknown_feature_are_named(mlp_library, runner_dir, tmp_path):
    x = [torch.randn(2, 8)]
    with pytest.raises(RuntimeError, match=r"model .*nothere\.so: No such file or directory"):
        _run(tmp_path / "nothere.so", x, runner_dir=runner_dir)
    with pytest.raises(RuntimeError, match="unknown CPU feature"):
        _run(mlp_library, x, require=["sve3"], runner_dir=runner_dir)
    with pytest.raises(RuntimeError, match="does not exist: build it"):
        _run(mlp_library, x, runner_dir=tmp_path)
    with pytest.raises(TypeError, match="complex64"):
        run_library(
            mlp_library, [torch.randn(2, 8, dtype=torch.complex64).numpy()], runner_dir=runner_dir
        )


@pytest.mark.needs_qemu
def test_build_runner_reuses_a_complete_build(runner_dir):
    binary = runner_dir / "tvm_runner"
    before = binary.stat().st_mtime_ns
    start = time.perf_counter()
    assert build_runner(runner_dir, progress=None) == runner_dir
    assert time.perf_counter() - start < 1.0
    assert binary.stat().st_mtime_ns == before


def test_missing_tools_name_their_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(arm.shutil, "which", lambda name: None)
    assert missing_tools() == [
        "aarch64-linux-gnu-g++ (apt-get install g++-aarch64-linux-gnu)",
        "qemu-aarch64-static (apt-get install qemu-user-static)",
    ]
    with pytest.raises(RuntimeError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        export_library(object(), tmp_path / "x.so")
    with pytest.raises(RuntimeError, match="apt-get install qemu-user-static"):
        run_library(tmp_path / "x.so", [])


def test_cpu_features_from_cpuinfo(tmp_path):
    """The in-process check graphopt.load makes on an ARM host (the runner's twin)."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull crc32 atomics fphp asimddp\n"
        "CPU implementer\t: 0x41\n"
    )
    assert arm.missing_cpu_features(["neon", "dotprod", "fp16"], cpuinfo) == []
    assert arm.missing_cpu_features(["+neon", "+sve", "+i8mm"], cpuinfo) == ["sve", "i8mm"]
    assert arm.missing_cpu_features(["v8.2a"], cpuinfo) == []  # not a feature it knows


def test_load_on_an_arm_host_refuses_a_library_for_features_it_lacks(tmp_path, monkeypatch):
    from graphopt.backends.tvm.target import _aarch64_runner

    library = tmp_path / "model.so"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("Features\t: fp asimd\n")
    real = arm.missing_cpu_features
    monkeypatch.setattr(arm, "missing_cpu_features", lambda features: real(features, cpuinfo))
    with pytest.raises(RuntimeError, match=r"built for \+sve but this CPU does not have sve"):
        _aarch64_runner(library, ["neon", "sve"], arm_host=True)
    assert _aarch64_runner(library, ["neon"], arm_host=True) is None
