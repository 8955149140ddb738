"""Sizes of traced values: a symbolic size (SymInt) as the number seen while tracing."""

from __future__ import annotations

from typing import Any

import torch


def concrete(value: Any) -> Any:
    """A SymInt/SymFloat replaced by its hint (the value seen while tracing); others unchanged."""
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        from torch.fx.experimental.symbolic_shapes import guard_scalar

        node = value.node
        return node.hint if node.hint is not None else guard_scalar(value)
    return value
