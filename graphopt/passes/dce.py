"""eliminate_dead_code: drop unused nodes and the constants no node reads anymore."""

from __future__ import annotations

import torch
import torch.fx

from graphopt.config import Config
from graphopt.passes.base import PassResult


def eliminate_dead_code(gm: torch.fx.GraphModule, cfg: Config) -> PassResult:
    """Remove nodes whose results are unused, then buffers and parameters nothing reads.

    Nodes go through `Graph.eliminate_dead_code`, which keeps impure nodes (mutations, random
    ops, side effects) even when unused. A buffer, parameter or tensor attribute is deleted
    when no get_attr or call_module target is it or contains it; unused submodules go too
    (`GraphModule.delete_all_unused_submodules`).

    Args:
        gm: a graph module; changed in place.
        cfg: unused.

    Returns:
        PassResult with stats {"removed_nodes": n, "removed_constants": k}.
    """
    graph = gm.graph
    nodes_before = len(graph.nodes)
    graph.eliminate_dead_code()
    removed_nodes = nodes_before - len(graph.nodes)
    used = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}

    def is_used(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in used for i in range(1, len(parts) + 1))

    names = [name for name, _ in gm.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in gm.named_buffers(remove_duplicate=False)]
    names += [k for k, v in vars(gm).items() if isinstance(v, torch.Tensor)]
    removed_constants = 0
    for name in dict.fromkeys(names):
        if is_used(name):
            continue
        owner, _, attr = name.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if hasattr(module, attr):
            delattr(module, attr)
            removed_constants += 1
    modules_before = len(list(gm.modules()))
    gm.delete_all_unused_submodules()
    removed_modules = modules_before - len(list(gm.modules()))
    modified = removed_nodes > 0 or removed_constants > 0 or removed_modules > 0
    if modified:
        graph.lint()
        gm.recompile()
    return PassResult(
        gm, modified, {"removed_nodes": removed_nodes, "removed_constants": removed_constants}
    )
