"""A graph split into pipeline stages (graphopt/passes/partition_stages.py), run in one process.

`graphopt.optimize(model, inputs, devices=["cpu", "cuda:0"])` plans the stages by the cost
model, lowers each stage for its device, and runs them one after another, moving the values
that cross a cut to the next stage's device and the outputs back to where the model returns
them. A CPU stage is lowered for `target` when its code runs on the host (inductor otherwise),
a CUDA stage by TVM for "cuda" (dlight schedules); ops TVM lacks run in PyTorch on the GPU.
Across processes: graphopt/distributed.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from graphopt import targets
from graphopt.config import Config
from graphopt.lowering import backend_for, lower
from graphopt.passes.base import fake_value, get_attr_value
from graphopt.passes.partition_stages import (
    DeviceSpec,
    measure_bandwidth,
    measure_flops,
    measure_link,
    plan_stages,
    plan_svg,
    split_stages,
)
from graphopt.report import PartitionRecord, Report

log = logging.getLogger("graphopt")


def stage_target(device: str, cfg: Config) -> str:
    """The graphopt target a stage on `device` is lowered for: TVM's "cuda" on a GPU; on the
    CPU, `cfg.target` when it runs there, else inductor ("cpu")."""
    if torch.device(device).type == "cuda":
        return "cuda"
    return cfg.target if targets.TARGETS[cfg.target].host else "cpu"


def device_specs(devices: Sequence[str], cfg: Config | None = None) -> list[DeviceSpec]:
    """The cost model's view of `devices`: matmul throughput, memory bandwidth, the link from
    the previous device (measured here, once each), GPU memory, and which ops the stage's
    backend lowers.

    Raises:
        ValueError: a device that is not "cpu" or "cuda[:0]", or a GPU torch does not see.
    """
    cfg = cfg or Config()
    specs: list[DeviceSpec] = []
    for name in devices:
        device = _check_device(name)
        target = stage_target(name, cfg)
        stage_cfg = dataclasses.replace(cfg, target=target, devices=None)
        backend = backend_for(stage_cfg)  # a GPU TVM cannot see fails here, first
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
                backend=backend.label,
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
    report.stages = plan.record()
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
