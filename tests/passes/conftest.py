"""Helpers shared by the per-pass tests: capture a small module, inspect ops, compare numerics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from graphopt.capture import capture_export
from graphopt.config import Config
from graphopt.passes.base import PassResult
from graphopt.testing import assert_same_outputs

CFG = Config()


def capture(
    model: torch.nn.Module, *inputs: torch.Tensor, dynamic_shapes: Any = None
) -> tuple[torch.fx.GraphModule, list[Any]]:
    """(frozen core-ATen graph of `model` in eval mode, its example inputs)."""
    captured = capture_export(model.eval(), inputs, dynamic_shapes=dynamic_shapes)
    return captured.gm, captured.example_inputs


def batch_dim(n_inputs: int = 1) -> tuple[dict[int, torch.export.Dim], ...]:
    """dynamic_shapes for `n_inputs` inputs whose dim 0 is a symbolic batch."""
    batch = torch.export.Dim("batch", min=2, max=64)
    return tuple({0: batch} for _ in range(n_inputs))


def ops(gm: torch.fx.GraphModule) -> Counter:
    """How often each call_function target occurs in the graph."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def assert_matches_eager(model: torch.nn.Module, gm: torch.fx.GraphModule, *inputs: Any) -> None:
    with torch.no_grad():
        assert_same_outputs(model(*inputs), gm(*inputs))


def assert_noop(fn: Callable[[torch.fx.GraphModule, Config], PassResult], gm) -> PassResult:
    """Run a pass that must find nothing: modified is False and the code is unchanged."""
    code = gm.code
    result = fn(gm, CFG)
    assert result.modified is False, result.stats
    assert result.gm.code == code
    return result


def randomize_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm random statistics and affine parameters (fresh ones are identity)."""
    gen = torch.Generator().manual_seed(1)
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=gen))
            bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            if bn.affine:
                bn.weight.data.copy_(torch.randn(n, generator=gen))
                bn.bias.data.copy_(torch.randn(n, generator=gen))
    return model.eval()
