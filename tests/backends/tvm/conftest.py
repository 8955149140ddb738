"""Shared helpers of the TVM backend tests: compile a graph for x86 and compare with eager."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from graphopt.backends.tvm import TVM, compile_subgraph
from graphopt.config import Config
from graphopt.testing import assert_same_outputs

LLVM = Config(target="llvm")


def unsupported_nodes(gm: torch.fx.GraphModule, cfg: Config = LLVM) -> list[tuple[str, str]]:
    """(node, reason) for each node the TVM registry does not take."""
    return [
        (node.name, TVM.unsupported_reason(node, cfg))
        for node in gm.graph.nodes
        if not TVM.supports(node, cfg)
    ]


@pytest.fixture
def tvm_matches() -> Callable[..., Any]:
    """check(gm, inputs, expected) -> the compiled callable, after asserting that every node
    has a TVM rule and that the compiled outputs match `expected` (eager's outputs)."""

    def check(gm: torch.fx.GraphModule, inputs: Sequence[Any], expected: Any) -> Any:
        assert unsupported_nodes(gm) == []
        compiled = compile_subgraph(gm, list(inputs), LLVM)
        got = compiled(*inputs)
        expected = tuple(expected) if isinstance(expected, list | tuple) else (expected,)
        assert_same_outputs(expected, got)
        return compiled

    return check


@pytest.fixture
def cuda_kernels() -> Callable[..., str]:
    """check(executable, cfg) -> the CUDA source TVM embedded in `executable`, after asserting
    it holds at least 3 kernels and, when nvcc is installed, that they compile to PTX."""
    import shutil

    from graphopt.backends.tvm.build import compile_cuda_kernels, cuda_source, target_for

    def check(executable: Any, cfg: Config) -> str:
        source = cuda_source(executable)
        assert source.count("__global__") >= 3
        if shutil.which("nvcc"):
            assert compile_cuda_kernels(executable, target_for(cfg)) >= 3
        return source

    return check
