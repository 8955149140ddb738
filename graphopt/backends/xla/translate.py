"""ATen graph -> a JAX function: `build_jax(gm, cfg)` applies one rule per node (`rules.XLA`).

The result is a pure function `fn(params, inputs) -> tuple of arrays` over the graph's
constants (`params`, the get_attr tensors in graph order) and its tensor placeholders, which
`jax.jit` traces and XLA compiles: for the CPU here, for a TPU or GPU wherever JAX has one, and
`jax.export` serializes as StableHLO. Constants are arguments, not literals baked into the
program, so compiling does not fold or copy the weights and an exported program keeps them in
a file of their own.

Sizes are read from the arrays being traced (`x.shape`): concrete ints under `jax.jit` (which
traces again for each new input shape), symbolic dimensions under `jax.export` with symbolic
shapes. A torch symbol (s0 in a SymInt) is bound to the first input dim that is exactly it.
Every rule's result is checked against the dtype, rank and static sizes torch traced, so a rule
bug is a `LoweringError` (the partition runs in PyTorch) rather than wrong numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.fx

from graphopt.backends import rule_context
from graphopt.backends.xla.rules import XLA, XLA_DTYPES
from graphopt.config import Config
from graphopt.ops import op_name
from graphopt.passes.base import get_attr_value


class LoweringError(rule_context.LoweringError):
    """A graph the XLA backend cannot build; the caller runs that partition in PyTorch."""

    lowered_to = "XLA"


class LoweringContext(rule_context.RuleContext):
    """What a rule sees (`rule_context.RuleContext`): the JAX value of each fx argument (an
    int, or a symbolic dimension under `jax.export`, for SymInt nodes), and traced values from
    meta["val"]."""

    error = LoweringError
    dtypes = XLA_DTYPES

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.constants: dict[torch.fx.Node, torch.Tensor] = {}  # get_attr node -> its tensor

    def ndim(self, node: Any) -> int:
        return self.val(node).dim()

    def shape(self, node: Any) -> tuple[Any, ...]:
        """The shape of a node's tensor value: its traced shape, symbolic dims as sizes."""
        return tuple(self.dim(d) for d in self.val(node).shape)

    def constant(self, arg: Any) -> np.ndarray | None:
        """The values of a graph constant (a frozen weight) as numpy, None for any other
        argument: rules that choose a lowering by the values (int8 overflow bounds) read them."""
        value = self.constants.get(arg) if isinstance(arg, torch.fx.Node) else None
        if value is None or value.dtype in (torch.bfloat16,):
            return None
        return value.detach().cpu().numpy()


@dataclass
class JaxGraph:
    """A graph as a JAX function.

    Attributes:
        fn: `fn(params, inputs)` -> tuple of arrays; pure, for `jax.jit` / `jax.export`.
        params: the graph's constants (get_attr tensors), in the order `fn` takes them.
        param_names: their get_attr targets (the names of an artifact's weights).
        tensor_inputs: per placeholder, whether it is a tensor (SymInt placeholders are not
            passed: their sizes are read from the tensors' shapes).
        input_nodes: the tensor placeholders, in order.
        output_nodes: what each output of `fn` is in the graph.
    """

    fn: Callable[..., tuple[Any, ...]]
    params: list[torch.Tensor]
    param_names: list[str]
    tensor_inputs: list[bool]
    input_nodes: list[torch.fx.Node]
    output_nodes: list[Any]


def build_jax(gm: torch.fx.GraphModule, cfg: Config) -> JaxGraph:
    """`gm` (a frozen core-ATen graph with meta["val"] on every node) as a JAX function.

    Nothing is traced here: the rules run when `fn` is traced (`jax.jit`, `jax.export`), where a
    node no rule takes raises `LoweringError`. The registry's checks run here, so a graph with
    an unsupported node fails before any tracing.
    """
    placeholders = gm.graph.find_nodes(op="placeholder")
    tensor_inputs = []
    for node in placeholders:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor | torch.SymInt):
            raise LoweringError(node.name, f"input of type {type(value).__name__} (not a tensor)")
        tensor_inputs.append(isinstance(value, torch.Tensor))
    params, param_names, param_index = [], [], {}
    for node in gm.graph.find_nodes(op="get_attr"):
        value = get_attr_value(gm, node)
        if not isinstance(value, torch.Tensor):
            raise LoweringError(node.name, f"get_attr of a {type(value).__name__}, not a tensor")
        if value.dtype not in XLA_DTYPES:
            raise LoweringError(node.name, f"constant of dtype {value.dtype} has no XLA type")
        param_index[node] = len(params)
        params.append(value)
        param_names.append(str(node.target))
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    for node in calls:
        reason = XLA.unsupported_reason(node, cfg)
        if reason is not None:
            raise LoweringError(node.name, reason)
    out = gm.graph.find_nodes(op="output")[0].args[0]
    outputs = list(out) if isinstance(out, list | tuple) else [out]
    for arg in outputs:
        if not (isinstance(arg, torch.fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor)):
            raise LoweringError("output", f"output {arg} is not a tensor; XLA returns arrays")
    inputs = [n for n, t in zip(placeholders, tensor_inputs) if t]
    constants = list(params)

    def fn(params: list[Any], arrays: list[Any]) -> tuple[Any, ...]:
        ctx = LoweringContext(cfg)
        for node, array in zip(inputs, arrays):
            for d, size in zip(node.meta["val"].shape, array.shape):
                if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                    ctx.symbols.setdefault(d.node.expr.name, size)
            ctx.env[node] = array
        for node in placeholders:
            if node not in ctx.env:
                ctx.node = node
                ctx.env[node] = ctx.dim(node.meta["val"])
        for node, index in param_index.items():
            ctx.env[node] = params[index]
            ctx.constants[node] = constants[index]
        for node in calls:
            ctx.node = node
            ctx.env[node] = _lower_call(ctx, node)
        return tuple(ctx.env[arg] for arg in outputs)

    return JaxGraph(fn, params, param_names, tensor_inputs, inputs, outputs)


def _lower_call(ctx: LoweringContext, node: torch.fx.Node) -> Any:
    try:
        result = XLA.lookup(node.target).emit(ctx, node)
    except LoweringError:
        raise
    except (ValueError, TypeError, IndexError, NotImplementedError) as err:  # jax rejected it
        raise LoweringError(node.name, f"{op_name(node.target)}: {err}") from err
    if result is not None or node.users:  # a dead getitem of an output not computed is fine
        _check_result(ctx, node, node.meta.get("val"), result)
    return result


def _check_result(ctx: LoweringContext, node: torch.fx.Node, expected: Any, got: Any) -> None:
    """A rule's result must have the dtype, rank and static sizes torch traced for the node."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, jax.Array):
            raise LoweringError(node.name, f"rule returned {type(got).__name__}, not an array")
        want = jnp.dtype(ctx.dtype(expected.dtype))
        if got.dtype != want or got.ndim != expected.dim():
            raise LoweringError(
                node.name,
                f"rule gave {got.dtype}[{got.ndim}d], torch traced {want}[{expected.dim()}d]",
            )
        for i, (size, traced) in enumerate(zip(got.shape, expected.shape)):
            if isinstance(size, int) and not isinstance(traced, torch.SymInt) and size != traced:
                raise LoweringError(
                    node.name,
                    f"rule gave shape {list(got.shape)}, torch traced {list(expected.shape)} "
                    f"(dim {i})",
                )
    elif isinstance(expected, list | tuple) and isinstance(got, list | tuple):
        for want, value in zip(expected, got):
            if value is not None:
                _check_result(ctx, node, want, value)
