"""Data-parallel training under graphopt (DDP, FSDP2) against eager, on real gloo process groups.

Run by tests/e2e/test_ddp.py through torchrun (one process per rank):

    torchrun --nproc-per-node 2 -m tests.e2e.ddp_cases --out results.json [--cases a,b]

Each case trains `STEPS` SGD steps (momentum) from the same weights, each rank on its own
data, twice: eager DDP, then `torch.compile(DistributedDataParallel(model), backend=BACKEND)`
(dynamo's DDPOptimizer splits the graph at the buckets, graphopt compiles every piece's forward
and backward); the FSDP2 cases shard each decoder layer and compile it with graphopt instead.
Every rank compares each step's loss and, at the end, every parameter, gradient and buffer
(whole: FSDP's shards gathered) with the eager run, and rank 0 writes what each rank found
to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import graphopt
from graphopt.distributed import count_allreduce_bytes
from graphopt.testing import TOLERANCES, compare_outputs
from tests.models import TINY_BERT, ResidualCNN, tiny_llama

STEPS = 3
BACKEND = os.environ.get("DDP_CASES_BACKEND", "graphopt")  # or "inductor", to compare
LR = 0.05
BUCKET_MB = 1  # the smallest DDPOptimizer takes (DDP's first bucket is 1 MB)
WIDTH = 64  # ResidualCNN(64): 1.2 MB of weights, two buckets
VOCAB = 5000  # the BERT's embedding table, 1.3 MB of weights in all: two buckets

Batch = Callable[[int], tuple[Any, ...]]  # rank -> this rank's inputs


class GraphBreak(nn.Module):
    """Two compiled pieces around a data-dependent Python branch (a graph break)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:  # .item() inside `if`: dynamo breaks the graph here
            h = h * 2
        return self.c(torch.relu(self.b(h)))


def _cnn() -> nn.Module:
    return ResidualCNN(width=WIDTH)


def _cnn_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)


def _classify(model: Callable[..., Any], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        **{**TINY_BERT, "vocab_size": VOCAB},
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def _bert_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + rank)
    ids = torch.randint(0, VOCAB, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return ids, mask, torch.randint(0, 3, (4,), generator=g)


def _bert_loss(model: Callable[..., Any], batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    ids, mask, labels = batch
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _llama_batch(rank: int) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(400 + rank)
    return (torch.randint(0, 128, (2, 16), generator=g),)


def _llama_loss(model: Callable[..., Any], batch: tuple[torch.Tensor]) -> torch.Tensor:
    (ids,) = batch
    return model(input_ids=ids, labels=ids).loss


def _mlp_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(300 + rank)
    return torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


# name -> (make the model, this rank's batch, loss, how to run it)
CASES: dict[str, tuple[Callable[[], nn.Module], Batch, Callable, dict[str, Any]]] = {
    "cnn_batchnorm": (_cnn, _cnn_batch, _classify, {}),
    "bert": (_bert, _bert_batch, _bert_loss, {}),
    "graph_break": (GraphBreak, _mlp_batch, _classify, {}),
    # (under torch's python reducer, rank 0's buffers are not broadcast, with inductor too:
    # the BatchNorm statistics stay each rank's own, so buffers are not compared there)
    "cnn_python_reducer": (
        _cnn,
        _cnn_batch,
        _classify,
        {"optimize_ddp": "python_reducer", "own_buffers": True},
    ),
    # DDP communication hooks (gradient compression), eager and compiled alike
    "cnn_allreduce_hook": (_cnn, _cnn_batch, _classify, {"hook": "allreduce"}),
    "cnn_fp16_hook": (_cnn, _cnn_batch, _classify, {"hook": "fp16"}),
    # compiled autograd traces the backward inside the compiled step, DDP's all-reduce with it
    # (its python reducer: DDPOptimizer's bucket split does not apply there)
    "cnn_compiled_autograd": (
        _cnn,
        _cnn_batch,
        _classify,
        {"compiled_autograd": True, "optimize_ddp": "python_reducer", "own_buffers": True},
    ),
    # FSDP2, torchtitan's recipe: fully_shard each decoder layer (compiled with graphopt) and
    # the root; in fp32, and with bf16 parameters (MixedPrecisionPolicy, fp32 reductions)
    "llama_fsdp": (tiny_llama, _llama_batch, _llama_loss, {"fsdp": True}),
    "llama_fsdp_bf16": (tiny_llama, _llama_batch, _llama_loss, {"fsdp": True, "bf16": True}),
}


def _fully_shard(model: nn.Module, *, compiled: bool, bf16: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
    )
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
        if compiled:
            layer.compile(backend=BACKEND)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def train(case: str, rank: int, *, compiled: bool) -> tuple[list[torch.Tensor], nn.Module]:
    make, batch_of, loss_of, how = CASES[case]
    settings = contextlib.ExitStack()  # (DDP picks its reducer when it is built: set first)
    if compiled:
        mode = how.get("optimize_ddp", "ddp_optimizer")
        settings.enter_context(torch._dynamo.config.patch(optimize_ddp=mode))
        if how.get("compiled_autograd"):
            settings.enter_context(torch._dynamo.config.patch(compiled_autograd=True))
    with settings:
        torch.manual_seed(0)
        model = make().train()
        if how.get("fsdp"):
            model = ddp = _fully_shard(model, compiled=compiled, bf16=how.get("bf16", False))
            compiled = False  # (its layers are)
        else:
            ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
        if "hook" in how:
            _register_hook(ddp, how["hook"])
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        batch = batch_of(rank)

        def step(call: Callable[..., Any]) -> torch.Tensor:
            loss = loss_of(call, batch)
            loss.backward()
            return loss

        if not compiled:
            run = functools.partial(step, ddp)
        elif how.get("compiled_autograd"):  # the backward inside the compiled step
            run = torch.compile(functools.partial(step, ddp), backend=BACKEND)
        else:
            run = functools.partial(step, torch.compile(ddp, backend=BACKEND))
        losses = []
        counting = count_allreduce_bytes() if "hook" in how else contextlib.nullcontext({})
        with counting as sent:
            for _ in range(STEPS):
                optimizer.zero_grad()
                losses.append(run().detach())
                optimizer.step()
        model.allreduce_bytes_per_step = sent.get("bytes", 0) // STEPS
    return losses, model


def _register_hook(ddp: DDP, hook: str) -> None:
    """The default all-reduce as a hook (so its bytes are counted), or fp16 compression. (The
    bf16 hook needs NCCL; PowerSGD's all-reduces mismatch between gloo ranks in eager DDP too,
    torch 2.13: both for GPU runs.)"""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if hook == "allreduce":
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    else:
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)


def _state(model: nn.Module, buffers: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter, its gradient and (if `buffers`) every buffer, whole (FSDP's shards
    gathered)."""

    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    state = {name: whole(p.detach()) for name, p in model.named_parameters()}
    state |= {f"{name}.grad": whole(p.grad) for name, p in model.named_parameters()}
    return state | (dict(model.named_buffers()) if buffers else {})


def run_case(case: str, rank: int) -> dict[str, Any]:
    expected_losses, expected = train(case, rank, compiled=False)
    torch._dynamo.reset()
    graphopt.clear_reports()
    losses, model = train(case, rank, compiled=True)
    reports = graphopt.reports()
    how = CASES[case][3]
    buffers = not how.get("own_buffers")
    if how.get("bf16"):  # both runs compute in bf16: held to bf16's tolerance
        problem = _close(expected_losses, losses) or _close(
            _state(expected, buffers), _state(model, buffers)
        )
    else:
        problem = compare_outputs(expected_losses, losses) or compare_outputs(
            _state(expected, buffers), _state(model, buffers)
        )
    return {
        "problem": problem,
        "losses": [float(v) for v in losses],
        "forward_graphs": sum(r.mode == "training-forward" for r in reports),
        "backward_graphs": sum(r.mode == "training-backward" for r in reports),
        "other_graphs": sum(not r.mode.startswith("training") for r in reports),
        "fallbacks": sorted({f.op for r in reports for f in r.fallbacks}),
        "allreduce_bytes_per_step": model.allreduce_bytes_per_step,
        "eager_allreduce_bytes_per_step": expected.allreduce_bytes_per_step,
        "gradient_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def _close(expected: Any, actual: Any) -> str | None:
    rtol, atol = TOLERANCES[torch.bfloat16]
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as err:
        return str(err)[:2000]
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    found = {}
    for case in args.cases.split(","):
        try:
            found[case] = run_case(case, rank)
        except Exception as err:  # noqa: BLE001 - a failing case is a result, reported
            found[case] = {"problem": f"{type(err).__name__}: {err}"[:2000]}
        dist.barrier()
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, found)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": world, "ranks": everyone}, f, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
