"""Split a graph into pieces a backend can run, by asking the backend's op registry."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from graphopt.config import Config
from graphopt.ops import op_name
from graphopt.passes.base import PassResult, add_constant, get_attr_value

if TYPE_CHECKING:  # the registry is handed in by the lowering: no runtime import of backends/
    from graphopt.backends.registry import OpRegistry

PREFIX = "fused_"


class _RegistrySupport(OperatorSupportBase):
    def __init__(self, registry: OpRegistry, cfg: Config):
        self.registry, self.cfg = registry, cfg

    def is_node_supported(self, submodules, node: torch.fx.Node) -> bool:
        return node.op == "call_function" and self.registry.supports(node, self.cfg)


def unsupported_nodes(
    gm: torch.fx.GraphModule, registry: OpRegistry, cfg: Config
) -> list[tuple[str, str, str]]:
    """(node name, op, reason) for every call node the registry cannot lower."""
    out = []
    for node in gm.graph.nodes:
        if node.target is operator.getitem and not registry.supports(node.args[0], cfg):
            continue  # reading an output of an unsupported op: reported with that op
        if node.op in ("call_function", "call_method", "call_module"):
            reason = registry.unsupported_reason(node, cfg)
            if reason is not None:
                out.append((node.name, op_name(node.target), reason))
    return out


def partition_by_capability(
    gm: torch.fx.GraphModule, cfg: Config, registry: OpRegistry
) -> PassResult:
    """Fuse maximal groups of registry-supported nodes into `fused_N` submodules.

    Nodes no rule covers stay in the top-level graph and run in PyTorch. Constants a partition
    reads are moved into it as `get_attr` nodes, so a backend sees its weights, not inputs.

        x -> conv -> fft -> relu    =>    x -> fused_0(conv) -> fft -> fused_1(relu)
    """
    partitioner = CapabilityBasedPartitioner(
        gm, _RegistrySupport(registry, cfg), allows_single_node_partition=True
    )
    partitions = partitioner.propose_partitions()
    if not partitions:
        return PassResult(gm, False, {"partitions": 0})
    fused = partitioner.fuse_partitions(partitions, prefix=PREFIX)
    moved = 0
    for node in list(fused.graph.nodes):
        if node.op == "call_module" and node.target.startswith(PREFIX):
            moved += _inline_constant_inputs(fused, node)
    fused.graph.eliminate_dead_code()
    fused.graph.lint()
    fused.recompile()
    stats = {
        "partitions": sum(1 for n in fused.graph.nodes if n.op == "call_module"),
        "fallback_nodes": len(unsupported_nodes(gm, registry, cfg)),
        "constants_moved": moved,
    }
    return PassResult(fused, True, stats)


def _inline_constant_inputs(parent: torch.fx.GraphModule, call: torch.fx.Node) -> int:
    """Turn the get_attr arguments of a fused submodule call into constants of the submodule."""
    sub: torch.fx.GraphModule = getattr(parent, call.target)
    placeholders = sub.graph.find_nodes(op="placeholder")
    keep_args, moved = [], 0
    for arg, ph in zip(call.args, placeholders):
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            name = add_constant(sub, get_attr_value(parent, arg), arg.target)
            with sub.graph.inserting_before(ph):
                const = sub.graph.get_attr(name)
            const.meta.update(ph.meta)
            ph.replace_all_uses_with(const)
            sub.graph.erase_node(ph)
            moved += 1
        else:
            keep_args.append(arg)
    if moved:
        call.args = tuple(keep_args)
        sub.graph.lint()
        sub.recompile()
    return moved
