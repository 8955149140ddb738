"""Op-rule registries: one per lowering target, keyed by ATen `OpOverload`.

The registry *is* the capability list: `partition` asks `registry.unsupported_reason(node, cfg)`,
and an op without a rule becomes a PyTorch fallback partition (never a crash).

    TVM = OpRegistry("tvm")

    @TVM.rule(aten.relu.default)
    def relu(ctx, node):
        return ctx.emit(relax.op.nn.relu(ctx[node.args[0]]))
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from graphopt.ops import op_name
from graphopt.passes.base import named_args

# A check returns None when the node is supported, or a one-line reason when it is not.
Check = Callable[[torch.fx.Node, Any], "str | None"]


def traced(node: torch.fx.Node, cfg: Any) -> str | None:
    """A check: the node and its inputs carry traced values (meta["val"])."""
    missing = [n.name for n in [node, *node.all_input_nodes] if "val" not in n.meta]
    return f"no meta['val'] on {missing} (run FakeTensorProp)" if missing else None


def dtypes_in(dtypes: Any, lowered_to: str) -> Check:
    """A check: every tensor the node reads or makes has a dtype in `dtypes`."""

    def check(node: torch.fx.Node, cfg: Any) -> str | None:
        values = [node.meta.get("val")] + [n.meta.get("val") for n in node.all_input_nodes]
        for v in values:
            for value in v if isinstance(v, list | tuple) else [v]:
                if isinstance(value, torch.Tensor) and value.dtype not in dtypes:
                    return f"dtype {value.dtype} is not lowered to {lowered_to}"
        return None

    return check


def first_output_only(rule_of: str) -> Check:
    """A check for multi-output ops whose rule computes output 0 only (inference graphs use
    no more)."""

    def check(node: torch.fx.Node, cfg: Any) -> str | None:
        for user in node.users:
            if user.target is not operator.getitem or (user.args[1] != 0 and user.users):
                return f"uses more than output 0 (the {rule_of} rule computes output 0 only)"
        return None

    return check


def static_scalars(node: torch.fx.Node, cfg: Any) -> str | None:
    """A check: the node's scalar operands are Python numbers, not symbolic ones."""
    for a in [*node.args, *node.kwargs.values()]:
        value = a.meta.get("val") if isinstance(a, torch.fx.Node) else a
        if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
            return "symbolic scalar operand"
    return None


def integer_size(node: torch.fx.Node, cfg: Any) -> str | None:
    """A check for size arithmetic (sym_size, s0 * 4): the node's value is an integer."""
    value = node.meta.get("val")
    return None if isinstance(value, int | torch.SymInt) else "not an integer size expression"


def same_device_strided(node: torch.fx.Node, cfg: Any) -> str | None:
    """A check for `_to_copy`: a dtype change on the same device, strided (a device move or
    a layout change stays in PyTorch)."""
    a = named_args(node)
    source = a["input"].meta["val"]
    if a["device"] is not None and torch.device(a["device"]).type != source.device.type:
        return f"copy from {source.device} to {a['device']}"
    if a["layout"] not in (None, torch.strided):
        return f"layout {a['layout']}"
    return None


def static_arange(node: torch.fx.Node, cfg: Any) -> str | None:
    """A check for arange: start and step are Python numbers; the end may be a size."""
    a = named_args(node)
    for key in ("start", "step"):
        if isinstance(a.get(key), torch.fx.Node | torch.SymInt | torch.SymFloat):
            return f"symbolic arange {key}"
    if isinstance(a["end"], torch.SymFloat):
        return "symbolic float arange end"
    return None


def all_of(*checks: Check | None) -> Check:
    """A check passing when each of `checks` (None: skipped) passes; the first reason."""

    def check(node: torch.fx.Node, cfg: Any) -> str | None:
        for c in checks:
            reason = c(node, cfg) if c is not None else None
            if reason is not None:
                return reason
        return None

    return check


@dataclass(frozen=True)
class Rule:
    target: Any
    emit: Callable[..., Any]
    check: Check | None = None


class OpRegistry:
    """Lowering rules of one target, keyed by ATen OpOverload (or operator.getitem)."""

    def __init__(self, name: str, *, supports_all: bool = False):
        self.name = name
        self.supports_all = supports_all  # e.g. inductor: every ATen op has a lowering or fallback
        self._rules: dict[Any, Rule] = {}

    def rule(self, *targets: Any, check: Check | None = None):
        """Register the decorated function as the lowering of each of `targets`."""

        def register(fn):
            for target in targets:
                if target in self._rules:
                    raise ValueError(f"{self.name}: a rule for {target} is already registered")
                self._rules[target] = Rule(target, fn, check)
            return fn

        return register

    def lookup(self, target: Any) -> Rule | None:
        return self._rules.get(target)

    def unsupported_reason(self, node: torch.fx.Node, cfg: Any = None) -> str | None:
        """None if `node` can be lowered to this target, else why not (one line)."""
        if node.op != "call_function":
            return None if node.op in ("placeholder", "get_attr", "output") else f"{node.op} node"
        if self.supports_all:
            return None
        rule = self._rules.get(node.target)
        if rule is None:
            return f"no {self.name} rule for {op_name(node.target)}"
        return rule.check(node, cfg) if rule.check is not None else None

    def supports(self, node: torch.fx.Node, cfg: Any = None) -> bool:
        return self.unsupported_reason(node, cfg) is None

    def ops(self) -> list[str]:
        """Names of the ops this target has rules for (sorted)."""
        return sorted(op_name(t) for t in self._rules)

    def __contains__(self, target: Any) -> bool:
        return self.supports_all or target in self._rules

    def __len__(self) -> int:
        return len(self._rules)
