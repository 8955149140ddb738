"""Run a graph split into pipeline stages (passes/partition_stages.py): in one process, or as a
torch.distributed.pipelining pipeline over processes (gloo on CPU).

In one process: `graphopt.optimize(model, inputs, devices=["cpu", "cuda:0"])` plans the stages
by the cost model, lowers each stage for its device, and runs them one after another, moving
the values that cross a cut to the next stage's device and the outputs back to where the model
returns them. A CPU stage is lowered for `target` (inductor when target is "cuda"), a CUDA stage
by TVM for "cuda" (dlight schedules); ops TVM lacks run in PyTorch on the GPU.

Across processes, each rank runs one stage; launch with torchrun (one process per stage):

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

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from graphopt.config import Config
from graphopt.passes.partition_stages import (
    DeviceSpec,
    StagePlan,
    measure_bandwidth,
    measure_flops,
    measure_link,
    plan_stages,
    plan_svg,
    split_stages,
)
from graphopt.report import PartitionRecord, Report

log = logging.getLogger("graphopt")


HOST_TARGETS = ("cpu", "llvm", "onnx", "hls")  # targets whose code runs on the CPU


def stage_target(device: str, cfg: Config) -> str:
    """The graphopt target a stage on `device` is lowered for: TVM's "cuda" on a GPU; on the
    CPU, `cfg.target` when it runs there, else inductor ("cpu")."""
    if torch.device(device).type == "cuda":
        return "cuda"
    return cfg.target if cfg.target in HOST_TARGETS else "cpu"


def device_specs(devices: Sequence[str], cfg: Config | None = None) -> list[DeviceSpec]:
    """The cost model's view of `devices`: matmul throughput, memory bandwidth, the link from
    the previous device (measured here, once each), GPU memory, and which ops the stage's
    backend lowers.

    Raises:
        ValueError: a device that is not "cpu" or "cuda[:0]", or a GPU torch does not see.
    """
    from graphopt.lowering import backend_for

    cfg = cfg or Config()
    specs: list[DeviceSpec] = []
    for name in devices:
        device = _check_device(name)
        target = stage_target(name, cfg)
        backend = backend_for(target)  # a GPU TVM cannot see fails here, before any work
        stage_cfg = dataclasses.replace(cfg, target=target, devices=None)
        registry = backend.registry
        supports = (
            None if registry.supports_all else functools.partial(registry.supports, cfg=stage_cfg)
        )
        link = {}
        previous = specs[-1].name if specs else None
        if previous is not None and "cuda" in (torch.device(previous).type, device.type):
            link = {"link_bytes_per_s": measure_link(previous, name)}
        memory = {}
        if device.type == "cuda":
            memory = {"memory_bytes": torch.cuda.get_device_properties(device).total_memory}
        specs.append(
            DeviceSpec(
                name,
                measure_flops(name),
                measure_bandwidth(name),
                supports=supports,
                backend=backend.name,
                **link,
                **memory,
            )
        )
    return specs


def _check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"devices: {name!r} is not a device name ({err})") from err
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(
            f"devices: {name!r}: accepted device kinds are 'cpu' and 'cuda' ('cuda:0')"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"devices: {name!r}: torch sees no CUDA GPU here (torch.cuda.is_available() is "
            "False); this machine runs 'cpu' stages"
        )
    if device.index not in (None, 0):
        raise ValueError(
            f"devices: {name!r}: CUDA stages run on 'cuda:0' only (graphopt's TVM runtime "
            "uses the first GPU); several GPUs are not supported yet"
        )
    return torch.device("cuda", 0)


class StagedModule:
    """Stages run in order in this process; values move to each stage's device, and the
    outputs to `output_devices` (where the model returns them; None: they stay put)."""

    def __init__(
        self,
        stages: list[Callable[..., Any]],
        devices: list[str],
        output_devices: Sequence[torch.device | None] | None = None,
    ):
        self.stages, self.devices = stages, [torch.device(d) for d in devices]
        self.output_devices = output_devices

    def __call__(self, *inputs: Any) -> Any:
        values: Any = inputs
        for stage, device in zip(self.stages, self.devices):
            moved = [v.to(device) if isinstance(v, torch.Tensor) else v for v in values]
            values = stage(*moved)
        if self.output_devices is None:
            return values
        leaves, spec = torch.utils._pytree.tree_flatten(values)
        leaves = [
            v.to(d) if isinstance(v, torch.Tensor) and d is not None and v.device != d else v
            for v, d in zip(leaves, self.output_devices)
        ]
        return torch.utils._pytree.tree_unflatten(leaves, spec)


def lower_stages(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config, report: Report
) -> StagedModule:
    """Plan stages over `cfg.devices`, lower each for its device (`stage_target`), and
    stitch them."""
    from graphopt.lowering import lower

    plan = plan_stages(gm, device_specs(cfg.devices, cfg))
    log.info("graphopt partition: %s", plan.describe())
    stages = []
    for s, (module, stage) in enumerate(zip(split_stages(gm, plan), plan.stages)):
        device = _check_device(stage.device.name)  # "cuda" -> cuda:0, as values report it
        if _traced_device(module) != device:  # its values and weights now live on `device`
            retrace_on(module.to(device), device)
        stage_cfg = dataclasses.replace(
            cfg, target=stage_target(stage.device.name, cfg), devices=None
        )
        fakes = [n.meta.get("val") for n in module.graph.find_nodes(op="placeholder")]
        stages.append(lower(module, fakes, stage_cfg, report))
        fallback = f"; {len(stage.fallback)} op(s) in PyTorch" if stage.fallback else ""
        report.partitions.append(
            PartitionRecord(
                f"stage{s}",
                stage.device.name,
                {},
                len(stage.nodes),
                note=f"{stage.device.backend}: {stage.flops / 1e6:.1f} MFLOP, weights "
                f"{stage.params / 1e6:.2f} MB, {stage.bytes_in / 1e3:.1f} kB in; cost model "
                f"{stage.seconds * 1e3:.3f} ms{fallback}",
            )
        )
    report.stages = plan.describe()
    report.stages_svg = plan_svg(gm, plan)
    outputs = gm.graph.find_nodes(op="output")[0].args[0]
    output_devices = [
        value.device
        if isinstance(v, torch.fx.Node) and isinstance(value := v.meta.get("val"), torch.Tensor)
        else None
        for v in torch.utils._pytree.tree_leaves(outputs)
    ]
    return StagedModule(stages, [s.device.name for s in plan.stages], output_devices)


def _traced_device(module: torch.fx.GraphModule) -> torch.device | None:
    """The device of the first tensor value traced in `module` (None: no tensors)."""
    for node in module.graph.nodes:
        if isinstance(value := node.meta.get("val"), torch.Tensor):
            return value.device
    return None


def retrace_on(module: torch.fx.GraphModule, device: torch.device) -> None:
    """Redo `module`'s meta["val"] (FakeTensors) as if its inputs and constants were on
    `device`, keeping symbolic sizes: backends read the device of a value from there."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

    from graphopt.passes.base import fake_value, get_attr_value

    placeholders = module.graph.find_nodes(op="placeholder")
    values = [n.meta.get("val") for n in placeholders]
    mode = next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None)
    mode = mode or FakeTensorMode()
    for node in module.graph.nodes:
        if node.op == "call_function":
            node.meta["val"] = fake_value(node, mode)
            continue
        value = None
        if node.op == "placeholder":
            value = node.meta.get("val")
        elif node.op == "get_attr":
            value = get_attr_value(module, node)
        if isinstance(value, torch.Tensor):  # a fake made on `device`, not copied there:
            with unset_fake_temporarily(), mode:  # torch without CUDA makes fake CUDA tensors
                node.meta["val"] = torch.empty_strided(  # but cannot copy to CUDA
                    value.shape, value.stride(), dtype=value.dtype, device=device
                )


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
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    group: Any = None,
    **options: Any,
) -> Callable[..., Any]:
    """This rank's stage of a pipeline over the process group (one stage per rank).

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
    """
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from graphopt.passes.base import make_trainable

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    captured, gm, plan = plan_for(model, microbatch_inputs, world, **options)
    shared: list[Any] = [plan.assignment if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0, group=group)
    plan = _replan(plan, shared[0])
    module = split_stages(gm, plan)[rank]
    if loss_fn is not None:
        make_trainable(module)
    stage = PipelineStage(module, rank, world, torch.device("cpu"), group=group)
    if loss_fn is None:
        schedule = ScheduleGPipe(stage, n_microbatches=n_microbatches)
    else:
        schedule = Schedule1F1B(
            stage,
            n_microbatches=n_microbatches,
            loss_fn=lambda out, target: loss_fn(_as_model_output(out, captured), target),
        )
    first, last = rank == 0, rank == world - 1

    def run(*inputs: torch.Tensor, target: Any = None) -> Any:
        flat = captured.flat_inputs(inputs) if first else ()
        if loss_fn is not None:
            if last and target is None:
                raise ValueError("pipeline training: the last rank must pass target=...")
            losses: list[torch.Tensor] = []
            kwargs = {"target": target, "losses": losses} if last else {}
            schedule.step(*flat, **kwargs)
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
