"""Run a graph split into pipeline stages (passes/partition_stages.py): in one process, or as a
torch.distributed.pipelining pipeline over processes (gloo on CPU).

In one process: `graphopt.optimize(model, inputs, devices=["cpu", "cpu"])` plans the stages by
the cost model, lowers each stage for `target`, and runs them one after another, moving the
values that cross a cut to the next stage's device.

Across processes, each rank runs one stage; launch with torchrun (one process per stage):

    # pipeline.py
    import torch, torch.distributed as dist, graphopt.distributed as gd
    dist.init_process_group("gloo")
    run = gd.pipeline(model, (x[:8],), n_microbatches=4)   # example input = one microbatch
    out = run(x)             # rank 0 feeds x (32 = 4 x 8 rows); the last rank gets the output
    # torchrun --nproc-per-node 2 pipeline.py

GPipe schedule (all microbatches forward, in order), for inference.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from graphopt.config import Config
from graphopt.passes.partition_stages import (
    DeviceSpec,
    StagePlan,
    measure_flops,
    plan_stages,
    split_stages,
)
from graphopt.report import PartitionRecord, Report

log = logging.getLogger("graphopt")


def device_specs(devices: Sequence[str]) -> list[DeviceSpec]:
    """The cost model's view of `devices` (throughput measured here, once per device)."""
    specs = []
    for name in devices:
        device = torch.device(name)  # raises for a malformed name
        if device.type != "cpu":
            raise NotImplementedError(
                f"devices: {name!r}: only CPU stages are implemented yet (several 'cpu' entries "
                "make a pipeline over processes or a staged run in one); CUDA stages are not"
            )
        specs.append(DeviceSpec(name, measure_flops(name)))
    return specs


class StagedModule:
    """Stages run in order in this process; values move to each stage's device."""

    def __init__(self, stages: list[Callable[..., Any]], devices: list[str]):
        self.stages, self.devices = stages, [torch.device(d) for d in devices]

    def __call__(self, *inputs: Any) -> Any:
        values: Any = inputs
        for stage, device in zip(self.stages, self.devices):
            moved = [v.to(device) if isinstance(v, torch.Tensor) else v for v in values]
            values = stage(*moved)
        return values


def lower_stages(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config, report: Report
) -> StagedModule:
    """Plan stages over `cfg.devices`, lower each for `cfg.target`, and stitch them."""
    from graphopt.lowering import lower

    plan = plan_stages(gm, device_specs(cfg.devices))
    log.info("graphopt partition: %s", plan.describe())
    stage_cfg = dataclasses.replace(cfg, devices=None)
    stages = []
    for s, (module, stage) in enumerate(zip(split_stages(gm, plan), plan.stages)):
        fakes = [n.meta.get("val") for n in module.graph.find_nodes(op="placeholder")]
        stages.append(lower(module, fakes, stage_cfg, report))
        report.partitions.append(
            PartitionRecord(
                f"stage{s}",
                stage.device.name,
                {},
                len(stage.nodes),
                note=f"{stage.flops / 1e6:.1f} MFLOP, weights {stage.params / 1e6:.2f} MB, "
                f"{stage.bytes_in / 1e3:.1f} kB in; cost model {stage.seconds * 1e3:.3f} ms",
            )
        )
    report.stages = plan.describe()
    return StagedModule(stages, [s.device.name for s in plan.stages])


def plan_for(model: torch.nn.Module, example_inputs: Sequence[Any], stages: int, **options: Any):
    """(captured graph after graphopt's passes, StagePlan over `stages` CPU devices)."""
    from graphopt.compiler import optimized_graph

    captured, gm = optimized_graph(model, example_inputs, Config.from_options(options))
    return captured, gm, plan_stages(gm, device_specs(["cpu"] * stages))


def pipeline(
    model: torch.nn.Module,
    microbatch_inputs: Sequence[torch.Tensor],
    n_microbatches: int,
    *,
    group: Any = None,
    **options: Any,
) -> Callable[..., Any]:
    """This rank's stage of a pipeline over the process group (one stage per rank).

    Every rank calls it with the same model and a one-microbatch example input. Rank 0 plans
    the stages (cost model) and sends the plan to the others, so all agree on the cuts. The
    returned function takes the whole batch on rank 0 (dim 0 = n_microbatches x the example's
    batch) and returns the model's output on the last rank, None elsewhere.
    """
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    captured, gm, plan = plan_for(model, microbatch_inputs, world, **options)
    shared: list[Any] = [plan.assignment if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0, group=group)
    plan = _replan(plan, shared[0])
    modules = split_stages(gm, plan)
    stage = PipelineStage(modules[rank], rank, world, torch.device("cpu"), group=group)
    schedule = ScheduleGPipe(stage, n_microbatches=n_microbatches)

    def run(*inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            if rank == 0:
                flat = captured.flat_inputs(inputs)
                out = schedule.eval(*flat)
            else:
                out = schedule.eval()
        if rank != world - 1:
            return None
        return torch.utils._pytree.tree_unflatten(
            list(out) if isinstance(out, tuple | list) else [out], captured.out_spec
        )

    run.plan = plan  # type: ignore[attr-defined]
    return run


def _replan(plan: StagePlan, assignment: dict[str, int]) -> StagePlan:
    """`plan` with rank 0's node assignment (stage stats stay this rank's estimates)."""
    if assignment == plan.assignment:
        return plan
    for s, stage in enumerate(plan.stages):
        stage.nodes = [n for n, a in assignment.items() if a == s]
    return StagePlan(plan.stages, assignment)
