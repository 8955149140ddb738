"""What every pass returns, and the small graph helpers passes share."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.node import map_arg
from torch.multiprocessing.reductions import StorageWeakRef

aten = torch.ops.aten


@dataclass(frozen=True)
class PassResult:
    """The outcome of one pass.

    Args:
        gm: the rewritten graph module (may be the same object, changed in place).
        modified: whether the graph changed.
        stats: counters of what the pass did, e.g. {"folded": 3}; shown in the report.
    """

    gm: torch.fx.GraphModule
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)


def get_attr_value(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    """The tensor a `get_attr` node refers to."""
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def add_constant(gm: torch.fx.GraphModule, value: torch.Tensor, hint: str) -> str:
    """Register `value` as a buffer of `gm` under a fresh name and return that name.

    Constants are buffers (not parameters) so inductor's freezing folds and prepacks them.
    """
    base = "_graphopt_" + "".join(c if c.isalnum() else "_" for c in hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value.detach(), persistent=True)
    return name


def insert_constant(
    gm: torch.fx.GraphModule, value: torch.Tensor, hint: str, before: torch.fx.Node
) -> torch.fx.Node:
    """Add `value` as a constant and insert a `get_attr` node for it before `before`.

    The node's meta["val"] is set to a fake tensor of the same shape, dtype and strides
    (from the graph's fake mode when there is one), so later passes see correct metadata.
    """
    name = add_constant(gm, value, hint)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = fake_like(gm, value)
    return node


def fake_mode_of(gm: torch.fx.GraphModule):
    """The fake mode the graph's meta["val"] tensors belong to, or None."""
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in gm.graph.nodes]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def fake_like(gm: torch.fx.GraphModule, value: torch.Tensor) -> torch.Tensor:
    """A fake tensor (in the graph's fake mode) describing a real constant."""
    mode = fake_mode_of(gm)
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return mode.from_tensor(value, static_shapes=True)


def count_call_nodes(gm: torch.fx.GraphModule) -> int:
    """Nodes that compute something (call_function/call_module/call_method)."""
    return sum(n.op in ("call_function", "call_module", "call_method") for n in gm.graph.nodes)


# Ops whose result is uninitialized memory: no value to fold, and two of them are not "the same".
_UNINITIALIZED = frozenset(
    {
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::empty_permuted",
    }
)


def is_pure(node: torch.fx.Node) -> bool:
    """True if a call_function node's result depends only on its arguments.

    False for mutating ops, random ops (they advance the RNG), ops with side effects,
    higher-order ops, uninitialized memory (`aten.empty*`) and callables other than torch ops
    and `operator`/sym functions. Folding, CSE and BN folding may only move pure nodes.
    """
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if target._schema.name in _UNINITIALIZED:
            return False
        if torch.Tag.nondeterministic_seeded in target.tags:
            return False
        return not node.is_impure()
    module = getattr(target, "__module__", None)
    if module == "torch":  # torch.sym_max, torch.sym_int, ... on SymInts
        return getattr(target, "__name__", "").startswith("sym_")
    return module in ("_operator", "math")


def mutates(node: torch.fx.Node) -> bool:
    """True if the node calls a torch op that writes to one of its arguments."""
    return isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable


def written_arguments(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The argument nodes a call writes to in place (its schema's `Tensor(a!)` arguments)."""
    if not mutates(node):
        return []
    written: list[torch.fx.Node] = []
    for i, arg in enumerate(node.target._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        values = value if isinstance(value, list | tuple) else [value]
        written += [v for v in values if isinstance(v, torch.fx.Node)]
    return written


def named_args(node: torch.fx.Node) -> dict[str, Any]:
    """A call's arguments by schema name with defaults filled in (`self` is called `input`)."""
    from torch.fx.operator_schemas import normalize_function

    pair = normalize_function(
        node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
    )
    if pair is None:
        raise ValueError(f"cannot match the arguments of {node.target} to its schema")
    return pair.kwargs


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with a copy of `gm`'s graph over the same attribute values.

    Nodes and their meta dicts are copied (not the traced fake values in them), weights and
    other constants are shared: `copy.deepcopy(gm)` would copy every tensor, which doubles the
    memory of the weights and fails inside torch.compile's fake mode on a real constant (a
    tensor literal in the model's forward).
    """
    graph = copy.deepcopy(gm.graph)
    out = torch.fx.GraphModule(gm, graph)
    out.meta = dict(gm.meta)
    return out


def storage_of(node: torch.fx.Node) -> StorageWeakRef | None:
    """The storage a node's traced value lives in (to tell aliases apart), if it has one."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return StorageWeakRef(val.untyped_storage())
    except NotImplementedError:  # tensors without storage (e.g. some subclasses)
        return None


class Emitter:
    """Inserts ATen call nodes before a node, with meta["val"] computed on the fake inputs."""

    def __init__(self, gm: torch.fx.GraphModule, before: torch.fx.Node, mode: Any) -> None:
        self.graph, self.before, self.mode = gm.graph, before, mode

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.call_function(target, args, kwargs)
        node.meta["val"] = fake_value(node, self.mode)
        return node


def fake_value(node: torch.fx.Node, mode: Any) -> Any:
    """What a call node computes, as fake tensors: its target run in `mode` on its inputs'
    meta["val"] (for new nodes, and for nodes whose inputs changed shape)."""
    args, kwargs = map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    with unset_fake_temporarily(), mode:
        return node.target(*args, **kwargs)


@dataclass
class Site:
    """A conv2d or linear layer with a constant float32 weight: what quantize and prune rewrite."""

    node: torch.fx.Node  # aten.convolution / aten.mm / aten.addmm
    kind: str  # "conv2d" or "linear"
    act_index: int  # argument position of the activation
    weight_index: int  # argument position of the weight constant
    name: str  # the layer's module path when known, else the node's name

    @property
    def act(self) -> torch.fx.Node:
        return self.node.args[self.act_index]

    @property
    def weight(self) -> torch.fx.Node:
        return self.node.args[self.weight_index]


def find_sites(gm: torch.fx.GraphModule) -> list[Site]:
    """Convolutions (2-D, not transposed) and matmuls by a constant float32 weight."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.convolution.default:
            transposed = node.args[6]
            site = Site(node, "conv2d", 0, 1, layer_name(node))
            ok = not transposed and constant_dim(gm, site.weight) == 4
        elif node.target is aten.mm.default:
            site = Site(node, "linear", 0, 1, layer_name(node))
            ok = constant_dim(gm, site.weight) == 2
        elif node.target is aten.addmm.default:
            site = Site(node, "linear", 1, 2, layer_name(node))
            ok = (
                constant_dim(gm, site.weight) == 2
                and node.kwargs.get("beta", 1) == 1
                and node.kwargs.get("alpha", 1) == 1
            )
        else:
            continue
        act = site.act
        if (
            ok
            and isinstance(act, torch.fx.Node)
            and act.op != "get_attr"
            and isinstance(act.meta.get("val"), torch.Tensor)
            and act.meta["val"].dtype == torch.float32
        ):
            sites.append(site)
    return sites


def constant_dim(gm: torch.fx.GraphModule, node: Any) -> int | None:
    """The number of dims of the float32 constant `node` reads (None: not one)."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    value = get_attr_value(gm, node)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
        return None
    return value.dim()


def layer_name(node: torch.fx.Node) -> str:
    """ "module.path (node)" from the node's nn_module_stack (export and dynamo spellings), else
    the node's name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        for prefix in ("L['self'].", "L['self']", "self."):
            path = path.removeprefix(prefix)
        path = path.replace("._modules['", ".").replace("']", "")
        if path:
            return f"{path} ({node.name})"
    return node.name


def make_trainable(gm: torch.fx.GraphModule) -> None:
    """Turn the graph's floating-point constants into parameters, one per reading node: CSE
    may have merged equal constants of different layers, which must train apart."""
    params: dict[str, torch.Tensor] = {}
    for node in list(gm.graph.find_nodes(op="get_attr")):
        value = get_attr_value(gm, node)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or not value.dim():
            continue
        for user in list(node.users):
            target = node.target
            if target in params:  # a second reader: give it its own copy
                target = f"{node.target}_{user.name}"
                gm.register_buffer(target, value)  # (made a parameter below)
                with gm.graph.inserting_before(user):
                    copy = gm.graph.get_attr(target)
                copy.meta.update(node.meta)
                user.replace_input_with(node, copy)
            params[target] = value.detach().clone()
        if not node.users:
            gm.graph.erase_node(node)
    for target, value in params.items():
        if hasattr(gm, target):
            delattr(gm, target)
        gm.register_parameter(target, torch.nn.Parameter(value))
    gm.graph.lint()
    gm.recompile()
