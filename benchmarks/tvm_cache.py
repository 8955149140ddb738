"""Time a TVM compile cold, then from graphopt's on-disk cache in this (second) process.

GRAPHOPT_CACHE_DIR=$(mktemp -d) python -m benchmarks.tvm_cache   # cold: builds, stores
GRAPHOPT_CACHE_DIR=<same dir>   python -m benchmarks.tvm_cache   # warm: loads
GRAPHOPT_CACHE=0                python -m benchmarks.tvm_cache   # no cache at all
"""

import time

import torch

from graphopt.backends.tvm import compile_subgraph
from graphopt.capture import capture_export
from graphopt.config import Config
from tests.models import ResidualCNN


def main() -> None:
    torch.manual_seed(0)
    captured = capture_export(ResidualCNN().eval(), (torch.randn(2, 3, 16, 16),))
    start = time.perf_counter()
    compiled = compile_subgraph(captured.gm, captured.example_inputs, Config(target="llvm"))
    ms = (time.perf_counter() - start) * 1e3
    print(f"compile_subgraph: {ms:.1f} ms, cache_hit={compiled.cache_hit}")


if __name__ == "__main__":
    main()
