"""The runnable examples run and print what they promise."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_quickstart_prints_passes_and_speed():
    out = _run("examples/quickstart.py", "--rounds", "2")
    assert "fold_batchnorm" in out and "speed vs eager" in out


def test_quickstart_in_bfloat16_reports_what_ran_in_it():
    out = _run("examples/quickstart.py", "--dtype", "bfloat16", "--rounds", "2")
    # Where the CPU has no native bfloat16 the report says why the graph stayed float32.
    assert re.search(r"bfloat16: (\d+ matmuls/convolutions in bfloat16|not applied)", out), out
    assert "relative error vs eager fp32" in out and "speed vs eager" in out


def test_quickstart_with_target_auto_names_every_engine_and_its_choice():
    out = _run("examples/quickstart.py", "--target", "auto", "--rounds", "2")
    assert "auto: chose " in out and "outputs match eager" in out
    assert all(f"{engine} " in out for engine in ("cpu", "onnx", "openvino")), out


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_int8_digits_prints_accuracy_report_and_speed(model):
    out = _run("examples/int8_digits.py", "--model", model, "--rounds", "2")
    assert "int8:" in out and "conv/linear layers quantized" in out
    assert "graphopt int8:" in out and "speed vs graphopt fp32" in out


def test_export_artifacts_writes_loads_and_times_each(tmp_path):
    out = _run("examples/export_artifacts.py", "--out", str(tmp_path), "--rounds", "2")
    for name in ("onnx-fp32", "onnx-int8", "tvm-x86", "stablehlo"):
        assert f"{name}: {tmp_path / name}" in out and f"| {name} |" in out
        assert (tmp_path / name / "manifest.json").is_file()
    assert out.count("loaded again: max abs error vs eager") == 4


def test_fpga_digits_exports_simulates_and_is_bit_exact(tmp_path):
    out = _run("examples/fpga_digits.py", "--model", "mlp", "--out", str(tmp_path / "p"))
    assert "bit-exact with graphopt's int8 reference: True" in out
    assert "DSP" in out and "reuse" in out


def test_pipeline_gloo_runs_two_processes_checks_the_output_and_trains(tmp_path):
    svg = tmp_path / "split.svg"
    out = _run(
        "examples/pipeline_gloo.py", "--rounds", "1", "--batch", "8", "--train", "4",
        "--svg", str(svg),
    )  # fmt: skip
    assert "2 stages, imbalance" in out and "pipeline of 2 processes" in out
    assert "one process" in out and "samples/s" in out
    losses = [
        float(line.split("loss ")[1].split()[0]) for line in out.splitlines() if "1F1B" in line
    ]
    assert len(losses) == 4 and losses[-1] < losses[0], losses  # the stages learn the batch
    assert svg.read_text().startswith("<svg")


def test_prune_digits_prunes_recovers_and_compiles():
    out = _run("examples/prune_digits.py", "--model", "mlp", "--steps", "100", "--rounds", "2")
    assert "prune: 50% of the channels" in out and "graphopt recover: 100 steps" in out
    assert "top-1: teacher" in out and "pruned int8:" in out and "speed vs dense" in out


def test_tune_llvm_tunes_then_times_untuned_and_tuned(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_TUNE_DIR", str(tmp_path))
    monkeypatch.setenv("GRAPHOPT_TUNE", "1")
    out = _run("examples/tune_llvm.py", "--budget", "300", "--max-trials", "16", "--rounds", "2")
    assert re.search(r"graphopt tune: (1[6-9]|2\d) trials over \d+ kernels", out), out[:500]
    assert "tuned outputs match eager" in out
    assert "| graphopt-llvm (untuned) |" in out and "| graphopt-llvm (tuned) |" in out


def test_ddp_digits_trains_two_ranks_with_fp16_gradients():
    out = _run("examples/ddp_digits.py", "--epochs", "2", "--fp16-hook")
    assert "replicas identical: True" in out
    sent, grads = re.search(r"per step by each rank: (\d+) bytes .*are (\d+) bytes", out).groups()
    assert int(sent) * 2 == int(grads)  # fp16 halves what is all-reduced
    accuracy = float(re.search(r"test accuracy: ([\d.]+)%", out).group(1))
    assert accuracy > 85, out
