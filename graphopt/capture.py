"""Capture: turn a model into a frozen, functional core-ATen FX graph.

Two entry points, one result:
  * `torch.compile` (dynamo) hands us a torch-IR graph; `aot_autograd` traces it to core ATen
    and calls our compilers (see `graphopt.backend`). `freeze_params` then replaces the
    parameter/buffer inputs with constants, as inductor's freezing does.
  * `graphopt.optimize` / `graphopt.export` use `torch.export` + `run_decompositions()`
    (`capture_export`), frozen with the same `freeze_placeholders`.
Both give a GraphModule whose placeholders are the user inputs only and whose weights are
`get_attr` constants, with `meta["val"]` fake tensors on every node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from graphopt.passes.base import add_constant


@dataclass
class CapturedGraph:
    """A frozen core-ATen graph and what is needed to call it like the original model.

    Args:
        gm: placeholders are user inputs (tensors, maybe SymInts); weights are constants.
        example_inputs: real values for the placeholders, in order.
        in_spec / out_spec: pytree specs of the model's (args, kwargs) and outputs
            (export path only; None for dynamo graphs, which dynamo flattens itself).
    """

    gm: torch.fx.GraphModule
    example_inputs: list[Any]
    in_spec: pytree.TreeSpec | None = None
    out_spec: pytree.TreeSpec | None = None

    def flat_inputs(self, args: Sequence[Any]) -> list[Any]:
        """Positional model inputs (e.g. a calibration batch) as values for gm's placeholders."""
        flat, spec = pytree.tree_flatten((tuple(args), {}))
        if self.in_spec is not None and spec != self.in_spec:
            raise ValueError(
                f"calibration batch does not match the example inputs: got inputs {spec}, "
                f"the model was captured for {self.in_spec}"
            )
        return flat


def is_param_source(placeholder: torch.fx.Node) -> bool:
    """True if a dynamo placeholder is a module parameter or buffer (by its dynamo source)."""
    grapharg = placeholder.meta.get("grapharg")
    if grapharg is None or grapharg.source is None:
        return False
    name = grapharg.source.name
    return "._parameters[" in name or "._buffers[" in name


def freeze_placeholders(
    gm: torch.fx.GraphModule, values: dict[int, torch.Tensor], *, share: bool = False
) -> list[int]:
    """Replace placeholder number i by a constant holding `values[i]`, in place.

    By default each constant is a copy: the graph is a snapshot of the weights (`optimize`
    and `export` return one), and sharing storage would let a later in-place update reach
    the layers that read a weight directly but not those whose weights were folded into new
    constants. `share=True` keeps the caller's tensors where their in-place updates can be
    detected (they carry a version counter, which inference tensors lack): torch.compile's
    graphs check the versions on every call and compile anew after an update, so a copy per
    graph would only cost memory (a decoder compiles several graphs: each held a copy of
    every weight).

    Returns the indices of the placeholders that remain (the runtime inputs).
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    placeholders = gm.graph.find_nodes(op="placeholder")
    kept = []
    with unset_fake_temporarily():
        for i, node in enumerate(placeholders):
            if i not in values:
                kept.append(i)
                continue
            value = values[i].detach()
            if not (share and isinstance(value, torch.Tensor) and not value.is_inference()):
                value = value.clone()
            name = add_constant(gm, value, node.name)
            with gm.graph.inserting_before(node):
                const = gm.graph.get_attr(name)
            const.meta.update(node.meta)
            const.meta.pop("grapharg", None)
            node.replace_all_uses_with(const)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return kept


def capture_export(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> CapturedGraph:
    """Capture `model` with torch.export, decompose to core ATen and freeze its weights.

    Raises ValueError if the model mutates its buffers (e.g. BatchNorm in training mode):
    a frozen graph cannot carry those updates; call `model.eval()` first.
    """
    from torch.export.graph_signature import InputKind

    args = tuple(example_inputs)
    try:
        ep = torch.export.export(
            model, args, kwargs=example_kwargs or {}, dynamic_shapes=dynamic_shapes, strict=False
        )
    except RuntimeError as err:
        cache = _cache_in_output(err)
        if cache is None:
            raise
        raise ValueError(
            f"{type(model).__name__} returns a {cache} (its key/value cache), which a captured "
            "graph cannot return. Capture it without the cache (transformers: "
            "model.config.use_cache = False), or, to generate with a cache, compile the "
            "forward: model.forward = torch.compile(model.forward, backend='graphopt') and "
            "model.generate(..., cache_implementation='static')"
        ) from err
    ep = ep.run_decompositions()
    sig = ep.graph_signature
    if sig.buffers_to_mutate or getattr(sig, "user_inputs_to_mutate", None):
        mutated = sorted(
            {**sig.buffers_to_mutate, **getattr(sig, "user_inputs_to_mutate", {})}.values()
        )
        raise ValueError(
            f"{type(model).__name__} mutates {mutated} when called; graphopt freezes weights and "
            "buffers for inference. Call model.eval() (BatchNorm in training mode updates its "
            "running statistics) or pass a model that does not change its state."
        )
    gm = ep.graph_module
    values = {}
    for i, spec in enumerate(sig.input_specs):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            values[i] = (
                ep.state_dict[spec.target]
                if spec.target in ep.state_dict
                else ep.constants[spec.target]
            )
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            values[i] = ep.constants[spec.target]
        elif spec.kind != InputKind.USER_INPUT:
            raise ValueError(f"graphopt cannot freeze export input {spec.arg} of kind {spec.kind}")
    freeze_placeholders(gm, values)
    flat_inputs = pytree.tree_leaves((args, example_kwargs or {}))
    return CapturedGraph(gm, list(flat_inputs), ep.call_spec.in_spec, ep.call_spec.out_spec)


def _cache_in_output(err: RuntimeError) -> str | None:
    """The name of the cache class torch.export found in a model's output, if that is why it
    failed ("Found <class '...DynamicCache'> in output, which is not a known type")."""
    import re

    found = re.search(r"Found <class '([\w.]+)'> in output", str(err))
    if found is None or "Cache" not in found.group(1):
        return None
    return found.group(1).rsplit(".", 1)[-1]
