"""ATen -> Relax lowering rules. `TVM` is the TVM backend's capability list.

Each rule is `fn(ctx, node) -> relax expression` (see `translate.LoweringContext` for `ctx`); a rule
with a `check` is offered a node only when the check returns None. An op with no rule here runs
in PyTorch. Families come from factories (`_unary`, `_binary`, `_compare`, `_reduce`, ...).

Shapes are read from the node's traced output (`ctx.shape(node)`), never recomputed, so
symbolic sizes flow through view/expand/full without special cases.
"""

from graphopt.backends.tvm.rules import elementwise, nn, quantized, reductions, shapes  # noqa: F401
from graphopt.backends.tvm.rules.common import TVM, TVM_DTYPES

__all__ = ["TVM", "TVM_DTYPES"]
