"""One partition of a graph compiled for a TVM target: `compile_subgraph(gm, inputs, cfg)` ->
`CompiledSubgraph` (a callable over torch tensors), looked up first in the disk cache
(`cache.py`), else translated (`translate.py`), built (`build.py`) and stored; it runs in
`runtime.py`'s VM wrapper.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from graphopt.backends.tvm import cache, tune
from graphopt.backends.tvm.build import _collectors, _schedule_and_build, optimize_relax, target_for
from graphopt.backends.tvm.runtime import CompiledSubgraph, runtime_device
from graphopt.backends.tvm.translate import build_relax
from graphopt.config import Config

aten = torch.ops.aten
log = logging.getLogger(__name__)


def compile_subgraph(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config
) -> CompiledSubgraph:
    """Build, compile and load `gm` for `cfg.target`; returns a callable over torch tensors.

    The library is looked up first in the disk cache (`cache.graph_key`: the whole graph,
    constants, input specs, options, target and versions); a miss compiles and stores it.

    Raises:
        LoweringError: the graph cannot be built (the caller runs it in PyTorch instead).
        RuntimeError: the target cannot run here (CUDA without a GPU, aarch64 on x86).
    """
    start = time.perf_counter()
    device = runtime_device(cfg)  # fail before the (slow) build
    target = target_for(cfg)
    tuning = tune.database_for(target)
    root, key = cache.cache_root(), None
    if root is not None:
        try:
            key = cache.graph_key(gm, cfg, target, tuning.digest if tuning else None)
        except cache.UncacheableGraph as err:
            log.info("graphopt: not caching this TVM graph: %s", err)
    compiled = None
    executable = cache.load(root, key) if key else None
    if executable is not None:
        try:
            compiled = CompiledSubgraph.for_graph(gm, executable, device, cache_hit=True)
        except (RuntimeError, ValueError) as err:  # the library loaded but its VM does not start
            cache.evict(root, key, f"its VM does not start: {err}")
    optimized = None  # the unscheduled kernels: what collect_kernels hands to tuning
    if compiled is None:
        mod = build_relax(gm, example_inputs, cfg)
        optimized = optimize_relax(mod, target)
        executable, (kernels, tuned) = _schedule_and_build(optimized, target, tuning)
        if key:
            cache.store(root, key, executable)
        compiled = CompiledSubgraph.for_graph(gm, executable, device, mod=mod)
        if tuning is not None:
            compiled.schedules = f"{tuned}/{kernels} kernels tuned"
    elif tuning is not None:
        compiled.schedules = "built with the tuning database"
    if _collectors:
        optimized = optimized or optimize_relax(build_relax(gm, example_inputs, cfg), target)
        for mods in _collectors:
            mods.append(optimized)
    compiled.compile_seconds = time.perf_counter() - start
    return compiled
