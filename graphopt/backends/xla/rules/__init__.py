"""ATen -> JAX lowering rules. `XLA` is the XLA backend's capability list.

Each rule is `fn(ctx, node) -> array` (see `translate.LoweringContext` for `ctx`), run while
JAX traces the graph's function; a rule with a `check` is offered a node only when the check
returns None. An op with no rule here runs in PyTorch. Families come from factories
(`_unary`, `_binary`, `_compare`, `_reduce`, ...), as the TVM rules are built.
"""

from graphopt.backends.xla.rules import (  # noqa: F401
    elementwise,
    nn,
    quantized,
    reductions,
    shapes,
    weight_only,
)
from graphopt.backends.xla.rules.common import XLA, XLA_DTYPES

__all__ = ["XLA", "XLA_DTYPES"]
