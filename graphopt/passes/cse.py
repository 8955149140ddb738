"""eliminate_common_subexpressions: merge nodes that compute the same value, and equal constants."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._python_dispatch import _disable_current_modes

from graphopt.config import Config
from graphopt.passes.base import PassResult, get_attr_value, is_pure, mutates, storage_of


def eliminate_common_subexpressions(gm: torch.fx.GraphModule, cfg: Config) -> PassResult:
    """Replace each node by an earlier node that computes the same value from the same inputs.

    Follows inductor's `fx_graph_cse` (torch/_functorch/compile_utils.py) but works in place and
    uses `is_pure` instead of its fixed list of random ops, which misses e.g. `aten.uniform`
    (torch's `CSEPass` also hashes 1 and 1.0 alike and fails on SymInt arguments). Never merged:
    random, mutating or side-effecting ops, `aten.empty*`, nodes whose value aliases a graph
    output (returned tensors stay distinct objects, as in eager), nodes defining unbacked
    symbols, and nodes on different sides of a mutation. Also merges get_attr nodes that read
    the same attribute, or constants with identical dtype, shape, strides and values.

    Before -> after:
        a = mul(x, 2); b = mul(x, 2); c = add(a, b)  ->  a = mul(x, 2); c = add(a, a)

    Args:
        gm: an ATen graph; changed in place.
        cfg: unused.

    Returns:
        PassResult with stats {"merged": computing nodes merged, "merged_constants": get_attr
        nodes merged}.
    """
    graph = gm.graph
    with _disable_current_modes():  # compares real constants, also inside torch.compile
        merged_constants = _merge_constants(gm)
    output = graph.output_node()
    returned = {s for n in output.all_input_nodes if (s := storage_of(n)) is not None}
    seen: dict[Any, torch.fx.Node] = {}
    region = 0  # bumped at every mutation: reads before and after it differ
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if not is_pure(node):
            region += mutates(node)
            continue
        if storage_of(node) in returned or _defines_unbacked(node):
            continue
        key = (region, node.target, _freeze(node.args), _freeze(node.kwargs))
        try:
            first = seen.setdefault(key, node)
        except TypeError:  # an argument that cannot be hashed (e.g. a slice): leave the node
            continue
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            merged += 1
    modified = merged > 0 or merged_constants > 0
    if modified:
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified, {"merged": merged, "merged_constants": merged_constants})


def _freeze(value: Any) -> Any:
    """A hashable key for an argument; numbers carry their type so 1, 1.0 and True differ."""
    if isinstance(value, list | tuple):  # fx stores lists as immutable_list
        return (tuple if isinstance(value, tuple) else list, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return (type(value), value.node)
    if isinstance(value, torch.fx.Node):
        return value
    return (type(value), value)


def _defines_unbacked(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.SymInt | torch.SymFloat | torch.SymBool) and bool(
        free_unbacked_symbols(val)
    )


def _merge_constants(gm: torch.fx.GraphModule) -> int:
    """Point get_attr nodes reading the same attribute or an equal tensor at one node."""
    graph = gm.graph
    by_target: dict[str, torch.fx.Node] = {}
    by_content: dict[Any, list[torch.fx.Node]] = {}
    merged = 0
    for node in list(graph.find_nodes(op="get_attr")):
        first = by_target.get(node.target)
        if first is None:
            value = get_attr_value(gm, node)
            key = _content_key(value)
            for other in by_content.get(key, []) if key is not None else []:
                if torch.equal(get_attr_value(gm, other), value):
                    first = other
                    break
            else:
                by_target[node.target] = node
                if key is not None:
                    by_content.setdefault(key, []).append(node)
                continue
        if first.meta.get("val") is None and "val" in node.meta:
            first.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(first)
        graph.erase_node(node)
        merged += 1
    return merged


def _content_key(value: Any) -> Any:
    """Layout plus a sample of values, so only likely-equal constants are compared in full."""
    if type(value) not in (torch.Tensor, torch.nn.Parameter) or value.layout != torch.strided:
        return None
    if value.requires_grad or value.is_quantized or value.is_complex() or value.is_meta:
        return None
    flat = value.reshape(-1)
    step = max(1, flat.numel() // 32)
    sample = tuple(flat[::step][:32].double().tolist())
    return (value.dtype, value.device, tuple(value.shape), value.stride(), sample)
