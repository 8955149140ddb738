"""fold_constants: precompute every node that depends only on frozen constants."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch._inductor.constant_folding import ConstantFolder
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _disable_current_modes

from graphopt.config import Config
from graphopt.passes.base import (
    PassResult,
    count_call_nodes,
    get_attr_value,
    insert_constant,
    is_pure,
)

# A folded constant may hold at most as many elements as the constants it is computed from
# together, or this many if that is more. So W.t() or W * scale fold, and so does a small
# arange or mask, but expand(scalar, [4096, 4096]) or full([B, L, L]) stay computed at run time
# (their consumers still fold when they are small again, e.g. a sum over the expand).
SMALL_NUMEL = 4096

# Not folded although pure: fp32 weights computed from int8 ones would undo quantization.
_KEEP_OP_NAMES = ("dequantize",)


class _Folder(ConstantFolder):
    """inductor's ConstantFolder with graphopt's rules: pure ops only, size limit, no outputs.

    ConstantFolder runs the graph with placeholders unknown, keeps the value of every node
    computable from get_attr constants, and records in `node_replacements` the frontier
    nodes whose values the rest of the graph still needs.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm, skip_constructors=False)
        self.source_numel: dict[torch.fx.Node, dict[torch.fx.Node, int]] = {}
        self.returned = set(gm.graph.output_node().all_input_nodes)
        self.current: torch.fx.Node | None = None
        self.current_sources: dict[torch.fx.Node, int] = {}

    def run_node(self, node: torch.fx.Node) -> Any:
        if node.op == "call_function" and (
            not is_pure(node) or any(k in str(node.target) for k in _KEEP_OP_NAMES)
        ):
            return self.unknown_value  # decided before running it: never execute a mutation
        self.current = node
        self.current_sources = {}
        for inp in node.all_input_nodes:
            self.current_sources.update(self.source_numel.get(inp, {}))
        out = super().run_node(node)
        if out is not self.unknown_value and node.op in ("get_attr", "call_function"):
            if node.op == "get_attr" and isinstance(out, torch.Tensor):
                self.current_sources[node] = out.numel()
            self.source_numel[node] = self.current_sources
        return out

    def insertable_tensor_check(self, tensor: torch.Tensor) -> bool:
        if isinstance(tensor, FakeTensor) or self.current in self.returned:
            # A returned constant would hand callers our buffer: they could mutate it.
            return False
        return tensor.numel() <= max(SMALL_NUMEL, sum(self.current_sources.values()))


def fold_constants(gm: torch.fx.GraphModule, cfg: Config) -> PassResult:
    """Replace every node computed only from get_attr constants by a new precomputed constant.

    Uses inductor's `ConstantFolder` (run outside any fake mode, so it works inside
    torch.compile) with these rules: random, mutating and side-effecting ops, `aten.empty*`
    and dequantize ops are never folded; a result larger than the constants it comes from
    (and than SMALL_NUMEL elements) stays computed; nodes the graph returns directly stay
    computed (from folded inputs). Only the frontier of the constant subgraph becomes new
    buffers (`_graphopt_<node name>`); constant nodes left without users are erased and
    their buffers deleted when no other get_attr refers to them.

    Before -> after:
        w_t = permute(w, [1, 0]); s = mul(w_t, 2); y = mm(x, s)
        -> y = mm(x, _graphopt_mul)       # _graphopt_mul holds (w.T * 2), computed once

    Args:
        gm: a frozen graph (weights are get_attr constants); changed in place.
        cfg: unused.

    Returns:
        PassResult with stats {"folded": computing nodes removed (now precomputed),
        "new_constants": buffers added, "removed_constants": buffers deleted}.
    """
    graph = gm.graph
    with _disable_current_modes(), torch.no_grad():
        folder = _Folder(gm)
        folder.run()
        replacements = {
            n: v for n, v in folder.node_replacements.items() if n.op == "call_function"
        }
        storages = {
            get_attr_value(gm, n).untyped_storage().data_ptr()
            for n in graph.find_nodes(op="get_attr")
            if isinstance(get_attr_value(gm, n), torch.Tensor)
        }
        for node, value in replacements.items():
            if value._is_view() and value.untyped_storage().data_ptr() not in storages:
                value = value.clone()  # own memory: a view would pin a larger intermediate
            # A view of a constant (w.t(), a reshape) stays one: a copy would hold every
            # weight twice while the backend packs it (and after, where it keeps the original).
            const = insert_constant(gm, value, node.name, before=node)
            node.replace_all_uses_with(const)
    calls_before = count_call_nodes(gm)
    removed_constants = _erase_dead_constants(gm, set(folder.source_numel))
    folded = calls_before - count_call_nodes(gm)
    modified = bool(replacements) or folded > 0 or removed_constants > 0
    if modified:
        graph.lint()
        gm.recompile()
    stats = {
        "folded": folded,
        "new_constants": len(replacements),
        "removed_constants": removed_constants,
    }
    return PassResult(gm, modified, stats)


def _erase_dead_constants(gm: torch.fx.GraphModule, candidates: set[torch.fx.Node]) -> int:
    """Erase constant-only nodes without users, delete buffers nothing reads; count those."""
    graph = gm.graph
    dead_targets = set()
    for node in reversed(list(graph.nodes)):
        if node in candidates and not node.users and node.op in ("get_attr", "call_function"):
            if node.op == "get_attr":
                dead_targets.add(node.target)
            graph.erase_node(node)
    used = {n.target for n in graph.find_nodes(op="get_attr")}
    removed = 0
    for target in sorted(dead_targets - used):
        owner, _, name = target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if isinstance(getattr(module, name, None), torch.Tensor):
            delattr(module, name)
            removed += 1
    return removed
