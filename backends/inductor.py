"""The default x86 lowering: inductor's codegen on the graph graphopt's passes produced.

Inductor lowers or falls back for every ATen op, so its registry supports everything and the
graph is never split. Frozen weights are buffers of the graph module, so inductor's freezing
(`torch._inductor.config.freezing`) folds them and prepacks them for oneDNN.

Inference graphs get inductor's C++ wrapper (`cpp_wrapper`): the code that allocates buffers
and calls each kernel is compiled C++ instead of Python, which takes the per-kernel Python
overhead off every call (MobileNetV2 through graphopt.optimize, 52 oneDNN convs: 14.1 -> 10.4
ms a call on 2 cores) for a longer first compile (a few seconds: g++ builds the wrapper).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import torch
import torch.fx

from graphopt.backends.registry import OpRegistry
from graphopt.config import Config

INDUCTOR = OpRegistry("inductor", supports_all=True)


def compile_inductor(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config, *, training: bool = False
) -> Callable[..., Any]:
    """Compile `gm` with inductor; returns a function of the same inputs.

    Args:
        example_inputs: fake tensors (inside torch.compile) or real ones (export path).
        training: a forward/backward graph of aot_autograd (weights are inputs: no freezing).
    """
    from torch._guards import TracingContext, detect_fake_mode, tracing
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    fake_mode = detect_fake_mode(list(example_inputs))
    stack = contextlib.ExitStack()
    with stack:
        if fake_mode is not None:
            # A fresh tracing context keeps inductor's own aot_autograd from overwriting the
            # metadata of the one torch.compile is running.
            stack.enter_context(tracing(TracingContext(fake_mode)))
            stack.enter_context(mock.patch.object(fake_mode, "allow_non_fake_inputs", True))
        stack.enter_context(inductor_config.patch(_settings(gm, example_inputs, training)))
        stack.enter_context(torch.no_grad())
        return compile_fx(gm, list(example_inputs))


def _settings(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], training: bool
) -> dict[str, bool]:
    """Inductor settings for a graph: frozen weights for inference (a training graph's weights
    are inputs that change), and the C++ wrapper where it works: inference graphs of static
    shapes without effect tokens. On torch 2.13 its entry point turns every input into a
    tensor, so the `None` token of a side-effecting op (linalg's error checks) and symbolic
    sizes (dynamic shapes) fail at the first call."""
    static = all(
        isinstance(x, torch.Tensor) and all(isinstance(d, int) for d in x.shape)
        for x in example_inputs
    )
    effects = gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.with_effects)
    return {"freezing": not training, "cpp_wrapper": not training and static and not effects}
