"""What every backend's rules see of the graph they lower: `RuleContext`, the base of the TVM
and XLA translators' contexts, and `LoweringError`.

A rule reads its arguments through the context (`ctx[arg]`: a node's lowered value, a SymInt
as a size of the backend's IR), traced values (`ctx.val`), dtypes in the backend's terms
(`ctx.dtype`) and sizes (`ctx.dim`). Sizes are torch's sympy expressions over the symbols of
the input dims (s0, s1, ...), evaluated by `evaluate_size` with the backend's integer,
floor-division and modulo; a backend's context says which (`SizeOps`).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx


class LoweringError(RuntimeError):
    """A graph a backend cannot build; the caller runs that partition in PyTorch."""

    lowered_to = "the backend"

    def __init__(self, node_name: str, reason: str):
        self.node_name = node_name
        self.reason = reason
        super().__init__(f"{self.lowered_to} cannot lower node {node_name!r}: {reason}")


@dataclass(frozen=True)
class SizeOps:
    """How a backend's IR spells a size expression's integers, floor division and modulo."""

    integer: Callable[[int], Any] = int
    floordiv: Callable[[Any, Any], Any] = operator.floordiv
    mod: Callable[[Any, Any], Any] = operator.mod


def evaluate_size(
    expr: Any, symbols: dict[str, Any], ops: SizeOps, error: Callable[[str], Exception]
) -> Any:
    """A torch shape expression (sympy over s0, s1, ...) over the sizes the symbols stand for
    (`symbols`: name -> the backend's value), built with `ops`; `error(reason)` for what it
    cannot express."""
    import sympy
    from torch.utils._sympy.functions import CleanDiv, FloorDiv, Mod, PythonMod

    def convert(e):
        if e.is_Integer:
            return ops.integer(int(e))
        if e.is_Symbol:
            if e.name not in symbols:
                raise error(f"symbol {e.name} is not the size of any input dim")
            return symbols[e.name]
        if isinstance(e, sympy.Add):
            return functools.reduce(operator.add, map(convert, e.args))
        if isinstance(e, sympy.Mul):
            return functools.reduce(operator.mul, map(convert, e.args))
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) > 0:
            return functools.reduce(operator.mul, [convert(e.base)] * int(e.exp))
        if isinstance(e, FloorDiv | CleanDiv):
            return ops.floordiv(convert(e.args[0]), convert(e.args[1]))
        if isinstance(e, Mod | PythonMod):
            return ops.mod(convert(e.args[0]), convert(e.args[1]))
        raise error(f"symbolic size {expr} uses {type(e).__name__}")

    return convert(expr)


class RuleContext:
    """The part of a translator's context every backend shares.

    `ctx[arg]` maps an fx Node to its lowered value, lists elementwise, SymInts to sizes
    (`dim`), and leaves Python scalars as they are. Subclasses set `error` (their
    LoweringError), `dtypes` (torch dtype -> theirs) and `size_ops`.
    """

    error: type[LoweringError] = LoweringError
    dtypes: dict[torch.dtype, Any] = {}
    size_ops = SizeOps()

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.env: dict[torch.fx.Node, Any] = {}
        self.symbols: dict[str, Any] = {}  # torch's symbol name -> the size it stands for
        self.node: torch.fx.Node | None = None  # the node being lowered (for error messages)

    def __getitem__(self, arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            return self.env[arg]
        if isinstance(arg, list | tuple):
            return [self[a] for a in arg]
        if isinstance(arg, torch.SymInt):
            return self.dim(arg)
        return arg

    def val(self, node: Any) -> Any:
        """The traced value of a node: meta["val"] (a FakeTensor, SymInt or tuple of them)."""
        if not isinstance(node, torch.fx.Node):
            return node
        if "val" not in node.meta:
            raise self.error(node.name, "no meta['val'] (run FakeTensorProp first)")
        return node.meta["val"]

    def dtype(self, node: Any) -> Any:
        """The backend's dtype of a node's tensor value (or of a torch.dtype)."""
        dtype = node if isinstance(node, torch.dtype) else self.val(node).dtype
        if dtype not in self.dtypes:
            raise self.error(
                self._where(), f"dtype {dtype} has no {self.error.lowered_to} equivalent"
            )
        return self.dtypes[dtype]

    def dim(self, d: Any) -> Any:
        """An int stays an int; a SymInt becomes the size it stands for here."""
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            if expr.is_Integer:
                return int(expr)
            return evaluate_size(
                expr, self.symbols, self.size_ops, lambda why: self.error(self._where(), why)
            )
        return int(d)

    def _where(self) -> str:
        return self.node.name if self.node is not None else "<graph>"
