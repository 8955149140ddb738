"""A graph split into pipeline stages (graphopt/passes/partition_stages.py) run as a
torch.distributed.pipelining pipeline over processes (gloo on CPU); in one process:
graphopt/stages.py.

Each rank runs one stage; launch with torchrun (one process per stage):

    # pipeline.py
    import torch, torch.distributed as dist, graphopt.distributed as gd
    dist.init_process_group("gloo")
    run = gd.pipeline(model, (x[:8],), n_microbatches=4)   # example input = one microbatch
    out = run(x)             # rank 0 feeds x (32 = 4 x 8 rows); the last rank gets the output
    # torchrun --nproc-per-node 2 pipeline.py

GPipe schedule (all microbatches forward, in order) for inference; with a `loss_fn`, one
training step per call with the 1F1B schedule (one forward, one backward, interleaved):

    run = gd.pipeline(model, (x[:8],), n_microbatches=4, loss_fn=torch.nn.functional.cross_entropy)
    opt = torch.optim.SGD(run.module.parameters(), lr=0.01)   # this rank's stage
    loss = run(x, target=y)  # rank 0 gives x, the last rank y and gets the loss
    opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from graphopt.config import Config
from graphopt.frontend import optimized_graph
from graphopt.passes.partition_stages import StagePlan, plan_stages, split_stages
from graphopt.stages import StagedModule, device_specs, retrace_on

__all__ = ["StagedModule", "count_allreduce_bytes", "pipeline", "plan_for", "retrace_on"]

log = logging.getLogger("graphopt")


def plan_for(model: torch.nn.Module, example_inputs: Sequence[Any], stages: int, **options: Any):
    """(captured graph after graphopt's passes, StagePlan over `stages` CPU devices)."""
    captured, gm = optimized_graph(model, example_inputs, Config.from_options(options))
    return captured, gm, plan_stages(gm, device_specs(["cpu"] * stages))


def pipeline(
    model: torch.nn.Module,
    microbatch_inputs: Sequence[torch.Tensor],
    n_microbatches: int,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    group: Any = None,
    replicas: int = 1,
    **options: Any,
) -> Callable[..., Any]:
    """This rank's stage of a pipeline over the process group (one stage per rank), or with
    `replicas` > 1, of one of `replicas` data-parallel copies of the pipeline (2-D parallelism).

    Every rank calls it with the same model and a one-microbatch example input. Rank 0 plans
    the stages (cost model) and sends the plan to the others, so all agree on the cuts.

    Inference (no `loss_fn`, GPipe schedule): the returned function takes the whole batch on
    rank 0 (dim 0 = n_microbatches x the example's batch) and returns the model's output on the
    last rank, None elsewhere.

    Training (`loss_fn(output, target)`, 1F1B schedule): the stage's floating-point constants
    become parameters (`run.module.parameters()`: build this rank's optimizer on them), and
    `run(batch, target=labels)` runs one forward and backward over the microbatches; gradients
    are accumulated in those parameters, as the mean over microbatches (torch.distributed.
    pipelining scales them). Rank 0 gives the batch, the last rank the target and gets the
    mean microbatch loss; other ranks get None. What trains is the graph after graphopt's
    passes: BatchNorm folded into the convolutions with its running statistics, dropout off
    (fine-tuning an inference graph, as `graphopt.recover` does).

    2-D (`replicas=R` over W ranks): W / R pipeline stages x R data-parallel replicas, on a
    `DeviceMesh` of shape (R, W / R) ("dp", "pp"): ranks 0..W/R-1 are replica 0's stages, the
    next W/R replica 1's, and so on. Each replica's first rank gives its own batch (and its last
    rank its targets); after the backward, each stage's gradients are averaged over the replicas
    (all-reduce in the "dp" group), so every replica's optimizer takes the same step, the one
    the whole batch (all replicas' batches) gives. The loss returned is the replica's own.
    """
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from graphopt.passes.base import make_trainable

    world = dist.get_world_size(group)
    if not isinstance(replicas, int) or replicas < 1 or world % replicas:
        raise ValueError(
            f"pipeline: replicas={replicas!r} must be a positive divisor of the {world} ranks"
        )
    dp_group = None
    if replicas > 1:
        if group is not None:
            raise ValueError("pipeline: replicas > 1 builds its own groups; leave group=None")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=("dp", "pp"))
        group, dp_group = mesh["pp"].get_group(), mesh["dp"].get_group()
    rank, stages = dist.get_rank(group), dist.get_world_size(group)
    captured, gm, plan = plan_for(model, microbatch_inputs, stages, **options)
    shared: list[Any] = [plan.assignment if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared, src=0)  # every replica takes rank 0's cuts
    plan = _replan(plan, shared[0])
    module = split_stages(gm, plan)[rank]
    if loss_fn is not None:
        make_trainable(module)
    stage = PipelineStage(module, rank, stages, torch.device("cpu"), group=group)
    if loss_fn is None:
        schedule = ScheduleGPipe(stage, n_microbatches=n_microbatches)
    else:
        schedule = Schedule1F1B(
            stage,
            n_microbatches=n_microbatches,
            loss_fn=lambda out, target: loss_fn(_as_model_output(out, captured), target),
        )
    first, last = rank == 0, rank == stages - 1

    def run(*inputs: torch.Tensor, target: Any = None) -> Any:
        flat = captured.flat_inputs(inputs) if first else ()
        if loss_fn is not None:
            if last and target is None:
                raise ValueError("pipeline training: the last rank must pass target=...")
            losses: list[torch.Tensor] = []
            kwargs = {"target": target, "losses": losses} if last else {}
            schedule.step(*flat, **kwargs)
            if dp_group is not None:  # the replicas' gradients averaged: one step for all
                for p in module.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad, group=dp_group)
                        p.grad /= replicas
            return torch.stack(losses).mean().detach() if last else None
        with torch.no_grad():
            out = schedule.eval(*flat)
        return _as_model_output(out, captured) if last else None

    run.plan = plan  # type: ignore[attr-defined]
    run.module = module  # type: ignore[attr-defined]
    return run


def _as_model_output(out: Any, captured: Any) -> Any:
    """The last stage's flat outputs in the structure the model returns."""
    leaves = list(out) if isinstance(out, tuple | list) else [out]
    return torch.utils._pytree.tree_unflatten(leaves, captured.out_spec)


def _replan(plan: StagePlan, assignment: dict[str, int]) -> StagePlan:
    """`plan` with rank 0's node assignment (stage stats stay this rank's estimates)."""
    if assignment == plan.assignment:
        return plan
    for s, stage in enumerate(plan.stages):
        stage.nodes = [n for n, a in assignment.items() if a == s]
    return StagePlan(plan.stages, assignment)


@contextlib.contextmanager
def count_allreduce_bytes() -> Iterator[dict[str, int]]:
    """Count what this process all-reduces through `torch.distributed.all_reduce` while the
    block runs: yields {"bytes": payload bytes, "calls": all_reduce calls}, filled in as it goes.

    Every DDP communication hook all-reduces through it (the default `allreduce_hook`, the
    bf16/fp16 compression hooks, PowerSGD), so with a hook registered this is the gradient
    traffic of each step; DDP's built-in C++ all-reduce (no hook) bypasses it. A ring
    all-reduce sends about 2 (n - 1) / n times the payload per rank. Use it around eager or
    torch.compile'd DDP with a hook, not with `optimize_ddp="python_reducer"` or compiled
    autograd: there dynamo traces the all-reduce itself, and a wrapped one changes the trace.

        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        with count_allreduce_bytes() as sent:
            loss_fn(compiled(x), y).backward()
        print(sent["bytes"])  # half of fp32's
    """
    import torch.distributed as dist

    counts = {"bytes": 0, "calls": 0}
    original = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        counts["bytes"] += tensor.numel() * tensor.element_size()
        counts["calls"] += 1
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield counts
    finally:
        dist.all_reduce = original
