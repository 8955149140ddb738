"""Data-parallel training under graphopt, on real gloo process groups launched by torchrun:
DistributedDataParallel and FSDP2 (fully_shard); loss and every parameter, gradient and buffer
equal eager's after several steps, on 2 and 4 ranks (tests/e2e/ddp_cases.py has the cases and
the comparison).

SyncBatchNorm is not among them: PyTorch runs it on CUDA modules only ("SyncBatchNorm layers
only work with GPU modules"), and these processes are CPU ones; nor are the bf16 and PowerSGD
communication hooks (the bf16 one needs NCCL; PowerSGD's all-reduces mismatch between gloo
ranks in eager DDP as well).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cases(cases: list[str], out: Path) -> list[str]:
    return ["-m", "tests.e2e.ddp_cases", "--out", str(out), "--cases", ",".join(cases)]


def _torchrun(ranks: int, cases: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    done = subprocess.run(
        command + _cases(cases, out), capture_output=True, text=True, timeout=900, env=ENV, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _check(result: dict, ranks: int, cases: list[str]) -> dict[str, dict]:
    assert result["world_size"] == ranks and len(result["ranks"]) == ranks
    for rank, found in enumerate(result["ranks"]):
        assert sorted(found) == sorted(cases)
        for case, what in found.items():
            assert what["problem"] is None, f"rank {rank}, {case}: {what['problem']}"
            assert not what["fallbacks"], (case, what["fallbacks"])
    return result["ranks"][0]


TWO_RANK_CASES = [
    "cnn_batchnorm",
    "bert",
    "graph_break",
    "cnn_python_reducer",
    "cnn_compiled_autograd",
    "cnn_allreduce_hook",
    "cnn_fp16_hook",
    "llama_fsdp",
    "llama_fsdp_bf16",
]


@pytest.mark.slow
def test_ddp_on_two_ranks_trains_as_eager_ddp(tmp_path):
    found = _check(_torchrun(2, TWO_RANK_CASES, tmp_path / "out.json"), 2, TWO_RANK_CASES)
    # dynamo's DDPOptimizer cut the models at their two buckets (or the graph break) and
    # graphopt compiled each piece's forward and backward
    for case in ("cnn_batchnorm", "bert", "graph_break"):
        assert found[case]["forward_graphs"] == found[case]["backward_graphs"] == 2, found[case]
    # FSDP2: each of the two decoder layers compiled by graphopt (fp32, and bf16 parameters)
    for case in ("llama_fsdp", "llama_fsdp_bf16"):
        assert found[case]["forward_graphs"] == found[case]["backward_graphs"] == 2, found[case]
    # python_reducer: one graph, DDP's own reducer hooks do the all-reduce
    assert found["cnn_python_reducer"]["forward_graphs"] == 1
    # compiled autograd: the backward (with DDP's all-reduce) traced by compiled autograd and
    # compiled by graphopt as one more graph, not by aot_autograd
    compiled_autograd = found["cnn_compiled_autograd"]
    assert compiled_autograd["forward_graphs"] == 1 and compiled_autograd["other_graphs"] >= 1
    assert compiled_autograd["backward_graphs"] == 0
    assert found["cnn_batchnorm"]["losses"][0] > found["cnn_batchnorm"]["losses"][-1]
    # communication hooks: what a rank all-reduces per step, compiled as in eager
    plain, fp16 = found["cnn_allreduce_hook"], found["cnn_fp16_hook"]
    assert plain["allreduce_bytes_per_step"] == plain["gradient_bytes"]
    assert fp16["allreduce_bytes_per_step"] == plain["gradient_bytes"] // 2
    for hooked in (plain, fp16):
        assert hooked["allreduce_bytes_per_step"] == hooked["eager_allreduce_bytes_per_step"]


@pytest.mark.slow
def test_ddp_on_four_ranks_trains_as_eager_ddp(tmp_path):
    cases = ["cnn_batchnorm", "bert"]
    found = _check(_torchrun(4, cases, tmp_path / "out.json"), 4, cases)
    assert all(found[case]["forward_graphs"] == 2 for case in cases)


@pytest.mark.slow
def test_two_nodes_rendezvous_on_localhost(tmp_path):
    """What `torchrun --nnodes 2` does on two machines, on one: two torchrun launchers, one
    process each, meeting at one rendezvous endpoint; DDP under graphopt trains as eager."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, cases = tmp_path / "out.json", ["cnn_batchnorm"]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                *_cases(cases, out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=ROOT,
        )  # fmt: skip
        for node in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=900)
        assert node.returncode == 0, err[-3000:]
    found = _check(json.loads(out.read_text()), 2, cases)
    assert found["cnn_batchnorm"]["forward_graphs"] == 2
