"""Apache TVM backend: ATen graphs -> Relax -> TVM for x86 ("llvm"), "cuda" and "aarch64".

`TVM` is the op-rule registry (the capability list the partitioner asks); `compile_subgraph`
turns one partition into a callable over torch tensors.
"""

from graphopt.backends.tvm.lower import (
    CompiledSubgraph,
    LoweringError,
    build_relax,
    compile_relax,
    compile_subgraph,
    target_for,
)
from graphopt.backends.tvm.rules import TVM

__all__ = [
    "TVM",
    "CompiledSubgraph",
    "LoweringError",
    "build_relax",
    "compile_relax",
    "compile_subgraph",
    "target_for",
]
