"""Apache TVM backend: ATen graphs -> Relax -> TVM for x86 ("llvm"), "cuda" and "aarch64".

`TVM` is the op-rule registry (the capability list the partitioner asks); `compile_subgraph`
turns one partition into a callable over torch tensors.

    translate.py  ATen graph -> Relax (`build_relax`, one rule per node from rules/)
    rules/        the op rules, a module per op family (elementwise, reductions, nn, ...)
    build.py      Relax -> a VM executable (legalize, fuse, schedule: schedules.py, tune.py)
    runtime.py    the executable called on torch tensors (`CompiledSubgraph`)
    lower.py      one partition: cache lookup (cache.py), else translate, build, store
    target.py     the `Backend` of targets llvm, aarch64 and cuda: compile, export, load
"""

from graphopt.backends.tvm.build import compile_relax, target_for
from graphopt.backends.tvm.lower import compile_subgraph
from graphopt.backends.tvm.rules import TVM
from graphopt.backends.tvm.runtime import CompiledSubgraph
from graphopt.backends.tvm.translate import LoweringError, build_relax

__all__ = [
    "TVM",
    "CompiledSubgraph",
    "LoweringError",
    "build_relax",
    "compile_relax",
    "compile_subgraph",
    "target_for",
]
