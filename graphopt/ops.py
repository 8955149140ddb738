"""Kinds of ATen ops that several passes and backends ask about, kept in one place, and
`op_name`, the name reports and errors give an op.

A pass or backend whose question is narrower keeps its own list beside the code that asks it
(and says why): e.g. `passes/quantize.py` follows a quantized value through view/reshape only.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

aten = torch.ops.aten

# Ops whose output torch returns as a view of their input (no copy, no arithmetic).
VIEWS = frozenset(
    {
        aten.view.default,
        aten._unsafe_view.default,
        aten.squeeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.unsqueeze.default,
        aten.permute.default,
        aten.t.default,
        aten.transpose.int,
        aten.expand.default,
        aten.slice.Tensor,
        aten.select.int,
        aten.alias.default,
    }
)

# Ops that change a tensor's shape but not the order of its elements.
RESHAPES = frozenset(
    {
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.squeeze.default,
        aten.unsqueeze.default,
        aten.flatten.using_ints,
    }
)

# Activations an int8 layer applies by clamping its output (they fuse into the layer).
CLAMPS = (aten.relu.default, aten.hardtanh.default, aten.clamp.default)


def op_name(target: Any) -> str:
    """A readable name: 'aten.convolution.default', 'operator.getitem'."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    if target is operator.getitem:
        return "operator.getitem"
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
