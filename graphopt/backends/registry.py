"""Op-rule registries: one per lowering target, keyed by ATen `OpOverload`.

The registry *is* the capability list: `partition` asks `registry.unsupported_reason(node, cfg)`,
and an op without a rule becomes a PyTorch fallback partition (never a crash).

    TVM = OpRegistry("tvm")

    @TVM.rule(aten.relu.default)
    def relu(ctx, node):
        return ctx.emit(relax.op.nn.relu(ctx[node.args[0]]))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from graphopt.ops import op_name

# A check returns None when the node is supported, or a one-line reason when it is not.
Check = Callable[[torch.fx.Node, Any], "str | None"]


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
