"""remove_noops: drop ATen nodes whose output equals their input (copies, identity views, x*1)."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphopt.config import Config
from graphopt.passes.base import PassResult, mutates, storage_of

aten = torch.ops.aten

# Each rule returns the node the op is an identity of, or None. Shapes, dtype, device and
# strides are checked afterwards for every rule, so a rule only looks at the arguments.
Rule = Callable[[torch.fx.Node], "torch.fx.Node | None"]


def _first(node: torch.fx.Node) -> torch.fx.Node | None:
    return node.args[0] if isinstance(node.args[0], torch.fx.Node) else None


def _identity_permute(node: torch.fx.Node) -> torch.fx.Node | None:
    dims = list(node.args[1])
    return _first(node) if [d % len(dims) for d in dims] == list(range(len(dims))) else None


def _scalar_arg(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _binary_identity(neutral: int, *, alpha: bool = False) -> Rule:
    """`op(x, neutral)` is x (e.g. x * 1, x + 0), for a Python-number second argument."""

    def rule(node: torch.fx.Node) -> torch.fx.Node | None:
        other = node.args[1] if len(node.args) > 1 else None
        if not (_scalar_arg(other) and other == neutral):
            return None
        if alpha and not _scalar_arg(node.kwargs.get("alpha", 1)):
            return None
        if node.kwargs.get("rounding_mode") is not None:  # div(x, 1, rounding_mode="floor")
            return None
        return _first(node)

    return rule


def _eval_dropout(node: torch.fx.Node) -> torch.fx.Node | None:
    """getitem(native_dropout(x, p, train=False or p=0), 0) and dropout(x, p, False) are x."""
    if node.target is operator.getitem:
        drop = node.args[0]
        if node.args[1] != 0 or not isinstance(drop, torch.fx.Node):
            return None
        if drop.target is not aten.native_dropout.default:
            return None
    else:
        drop = node
    p, train = drop.args[1], drop.args[2] if len(drop.args) > 2 else drop.kwargs.get("train")
    return _first(drop) if train is False or p == 0 else None


RULES: dict[object, Rule] = {
    aten.clone.default: _first,
    aten.alias.default: _first,
    aten.detach.default: _first,
    aten.contiguous.default: _first,
    aten._to_copy.default: _first,  # dtype/device/layout/strides are compared below
    aten.view.default: _first,
    aten._unsafe_view.default: _first,
    aten.reshape.default: _first,
    aten.expand.default: _first,
    aten.permute.default: _identity_permute,
    aten.mul.Tensor: _binary_identity(1),
    aten.mul.Scalar: _binary_identity(1),
    aten.div.Tensor: _binary_identity(1),
    aten.div.Scalar: _binary_identity(1),
    aten.add.Tensor: _binary_identity(0, alpha=True),
    aten.add.Scalar: _binary_identity(0, alpha=True),
    aten.sub.Tensor: _binary_identity(0, alpha=True),
    aten.sub.Scalar: _binary_identity(0, alpha=True),
    aten.dropout.default: _eval_dropout,
    operator.getitem: _eval_dropout,
}

# Ops that copy: removing one is only safe when nothing in the graph mutates memory.
_COPIES = {aten.clone.default, aten._to_copy.default, aten.contiguous.default}


def _same(a: object, b: object) -> bool:
    return a is b or statically_known_true(a == b)


def _same_layout(a: object, b: object) -> bool:
    """Two meta["val"] tensors with provably equal shape, strides, dtype, device and layout."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if (a.dtype, a.device, a.layout) != (b.dtype, b.device, b.layout) or a.dim() != b.dim():
        return False
    if a.layout != torch.strided:
        return False
    return all(_same(x, y) for x, y in zip(a.shape, b.shape)) and all(
        _same(x, y) for x, y in zip(a.stride(), b.stride())
    )


def remove_noops(gm: torch.fx.GraphModule, cfg: Config) -> PassResult:
    """Remove ATen nodes that return their input unchanged.

    Handles clone/alias/detach/contiguous/_to_copy that change nothing, view/reshape/expand to
    the same shape, identity permute, x*1, x/1, x+0, x-0 (Python-number operands; x+0 maps
    -0.0 to +0.0, which is ignored as other compilers do), and dropout in eval form or p=0.
    A node is removed only when its meta["val"] has provably the same shape, strides, dtype
    and device as its input's (symbolic sizes are compared with `statically_known_true`), so
    later views stay valid. Kept: a node the graph returns directly whose input is a graph
    input, a constant or another output (the outputs would alias), and copies in graphs
    that mutate memory.

    Args:
        gm: a core-ATen graph with meta["val"] on its nodes; changed in place.
        cfg: unused.

    Returns:
        PassResult with stats {"removed": n, "removed_<op>": count per op}.
    """
    graph = gm.graph
    output = graph.output_node()
    functional = not any(mutates(n) for n in graph.nodes)
    boundary = {
        s
        for n in graph.nodes
        if n.op in ("placeholder", "get_attr")
        for s in [storage_of(n)]
        if s is not None
    }
    removed: Counter[str] = Counter()
    for node in list(graph.nodes):
        rule = RULES.get(node.target) if node.op == "call_function" else None
        source = rule(node) if rule is not None else None
        if source is None or not _same_layout(node.meta.get("val"), source.meta.get("val")):
            continue
        if node.target in _COPIES and not functional:
            continue
        if output in node.users and _would_alias(node, source, output, boundary):
            continue
        node.replace_all_uses_with(source)
        drop = node.args[0] if node.target is operator.getitem else None
        graph.erase_node(node)
        if drop is not None and not drop.users:  # the native_dropout the getitem read
            graph.erase_node(drop)
        op = drop.target if drop is not None else node.target
        removed[op._schema.name.split("::")[-1]] += 1
    modified = bool(removed)
    if modified:
        graph.lint()
        gm.recompile()
    stats = {"removed": sum(removed.values())}
    stats.update({f"removed_{k}": v for k, v in sorted(removed.items())})
    return PassResult(gm, modified, stats)


def _would_alias(
    node: torch.fx.Node, source: torch.fx.Node, output: torch.fx.Node, boundary: set
) -> bool:
    """Would returning `source` instead of `node` make an output alias an input or output?"""
    if source.op in ("placeholder", "get_attr") or source in output.all_input_nodes:
        return True
    storage = storage_of(source)
    if storage is None:
        return True
    others = {storage_of(n) for n in output.all_input_nodes if n is not node}
    return storage in boundary or storage in others
