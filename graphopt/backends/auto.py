"""target="auto": compile the graph for every engine available here, keep the fastest.

For an inference graph, each candidate engine (`CANDIDATES`: inductor; onnxruntime; OpenVINO,
each where its package is installed) compiles the optimized graph; each result is checked
against the graph's own outputs on the example inputs (relative error at most `TOLERANCE`;
`INT8_TOLERANCE` for an int8 graph, one QDQ graph for all three, shaped as the table's
`Int8Policy` for "auto" says),
then the ones that pass are timed in interleaved rounds (`graphopt.bench.compare_speed`, the
benchmarks' method) and the fastest is kept. A candidate that fails to compile, gives other
numbers or cannot run is reported and skipped. The report's partition note lists every
candidate with its time, error and compile seconds, and the choice.

The choice is cached on disk (`~/.cache/graphopt/auto`, see `graph_key.cache_root`) under the
sha256 of the graph (ops, shapes, constants), the options, the versions of graphopt, torch
and the engines, and this CPU (model, core count, torch's threads), so another process
compiles only the engine chosen before. `GRAPHOPT_AUTO=<engine>` forces one engine (no
measuring). Training graphs go to inductor, the engine that trains.

TVM (`llvm`) is not a candidate yet: without a tuning database covering the graph its
untuned schedules lose to the others, and tuning takes minutes per graph.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import torch
import torch.fx

from graphopt import targets
from graphopt.backends import graph_key
from graphopt.backends.base import Backend, Compiled
from graphopt.backends.registry import OpRegistry
from graphopt.config import Config
from graphopt.files import write_json
from graphopt.passes.base import copy_graph_module

log = logging.getLogger("graphopt")

AUTO = OpRegistry("auto", supports_all=True)
CANDIDATES = ("cpu", "onnx", "openvino")  # targets, in the order they are tried
TOLERANCE = 1e-3  # relative error a candidate may have against the graph's own outputs
# int8: the graph run in PyTorch simulates the integer arithmetic in float; the engines' integer
# kernels round their requantization differently (graphopt's own int8 tests allow 0.01)
INT8_TOLERANCE = 0.02
TIME_BUDGET_S = 1.0  # timing per graph, all candidates together (at least MIN_ROUNDS rounds)
MIN_ROUNDS, MAX_ROUNDS = 5, 50
KEY_FORMAT = 1  # bump when what the key hashes changes


@dataclasses.dataclass
class Candidate:
    engine: str
    compile_s: float = math.nan
    error: float = math.nan  # relative error against the graph's outputs
    median_ms: float = math.nan
    failure: str = ""  # why it was skipped
    compiled: Compiled | None = None

    def describe(self) -> str:
        if self.failure:
            return f"{self.engine} skipped ({self.failure})"
        timed = f"{self.median_ms:.3f} ms" if not math.isnan(self.median_ms) else "not timed"
        return f"{self.engine} {timed}, error {self.error:.1e}, compile {self.compile_s:.1f} s"


class AutoBackend(Backend):
    """The fastest engine here for each graph, measured (or cached, or forced)."""

    label = "auto"
    registry = AUTO

    def check_runs_here(self, cfg: Config) -> None:
        """A bad `GRAPHOPT_AUTO` is an error before anything compiles."""
        forced = os.environ.get("GRAPHOPT_AUTO")
        if forced and forced not in CANDIDATES:
            raise ValueError(f"GRAPHOPT_AUTO={forced!r}; accepted values: {list(CANDIDATES)}")

    def decompositions(self, training: bool) -> dict[Any, Any]:
        return targets.backend("cpu").decompositions(training)

    def training_capture(self, example_inputs: Sequence[Any]) -> Any:
        return targets.backend("cpu").training_capture(example_inputs)

    def compile(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        cfg: Config,
        *,
        training: bool = False,
        backward: bool = False,
    ) -> Compiled:
        if training:
            compiled = _compile(gm, example_inputs, cfg, "cpu", training, backward)
            compiled.note = "auto: inductor (training graphs)"
            return compiled
        forced = os.environ.get("GRAPHOPT_AUTO")
        if forced:
            self.check_runs_here(cfg)
            compiled = _compile(gm, example_inputs, cfg, forced)
            compiled.note = f"auto: {forced} (forced by GRAPHOPT_AUTO)"
            return compiled
        key = _key(gm, cfg)
        chosen = _cached_choice(key)
        if chosen is not None:
            try:
                compiled = _compile(gm, example_inputs, cfg, chosen)
            except Exception as err:  # noqa: BLE001 - measure again instead
                log.warning("graphopt auto: the cached choice %s failed (%s)", chosen, err)
            else:
                compiled.note = f"auto: {chosen} (measured before, cached)"
                compiled.cache_hit = True
                return compiled
        return _measure(gm, example_inputs, cfg, key)


def available() -> list[str]:
    """The candidate engines whose packages are installed here."""
    out = []
    for engine in CANDIDATES:
        try:
            targets.backend(engine)
        except RuntimeError:  # its extra is not installed
            continue
        out.append(engine)
    return out


def _compile(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    cfg: Config,
    engine: str,
    training: bool = False,
    backward: bool = False,
) -> Compiled:
    """`gm` compiled by `engine` (on a copy: backends may change the graph they get)."""
    backend = targets.backend(engine)
    engine_cfg = dataclasses.replace(cfg, target=engine)
    return backend.compile(
        copy_graph_module(gm), example_inputs, engine_cfg, training=training, backward=backward
    )


def _compile_sharing_onnx(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    cfg: Config,
    engine: str,
    exported: dict[str, Any],
) -> Compiled:
    """`_compile`, but the engines that read ONNX (`from_onnx`) share one export of the graph
    (the first such candidate's compile time includes it)."""
    backend = targets.backend(engine)
    if not hasattr(backend, "from_onnx") or not all(
        isinstance(x, torch.Tensor) for x in example_inputs
    ):
        return _compile(gm, example_inputs, cfg, engine)
    if "data" not in exported:
        from graphopt.backends.onnx import export_onnx

        exported["data"] = export_onnx(copy_graph_module(gm), example_inputs)
    return backend.from_onnx(exported["data"], example_inputs)


def _measure(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config, key: str | None
) -> Compiled:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from graphopt.backends.onnx import _real_like
    from graphopt.bench import compare_speed

    tolerance = INT8_TOLERANCE if cfg.quantize == "int8" else TOLERANCE
    candidates = [Candidate(engine) for engine in available()]
    exported: dict[str, Any] = {}  # onnxruntime and OpenVINO read one ONNX export
    for c in candidates:  # in the caller's (fake) mode, as the backends expect
        start = time.perf_counter()
        try:
            c.compiled = _compile_sharing_onnx(gm, example_inputs, cfg, c.engine, exported)
        except Exception as err:  # noqa: BLE001 - a failing candidate is skipped, named
            c.failure = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        c.compile_s = time.perf_counter() - start
    with unset_fake_temporarily(), torch.no_grad():
        inputs = [_real_like(x) for x in example_inputs]
        expected = gm(*inputs)
        for c in candidates:
            if c.failure or c.compiled is None:
                continue
            try:
                c.error = _error(expected, c.compiled(*inputs))
            except Exception as err:  # noqa: BLE001 - a failing candidate is skipped, named
                c.failure = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                continue
            if not c.error <= tolerance:
                c.failure = f"relative error {c.error:.1e} > {tolerance:g}"
        passed = [c for c in candidates if not c.failure]
        if not passed:
            raise RuntimeError(
                "target='auto': no engine compiled this graph to the right numbers: "
                + "; ".join(c.describe() for c in candidates)
            )
        start = time.perf_counter()
        for c in passed:  # one call each: how many rounds fit the budget
            c.compiled(*inputs)
        per_round = time.perf_counter() - start
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TIME_BUDGET_S / max(per_round, 1e-6))))
        timings = compare_speed({c.engine: c.compiled for c in passed}, inputs, rounds=rounds)
    for c, t in zip(passed, timings, strict=True):
        c.median_ms = t.median_ms
    best = min(passed, key=lambda c: c.median_ms)
    summary = "; ".join(c.describe() for c in candidates)
    log.info("graphopt auto: chose %s (%s)", best.engine, summary)
    if key is not None:
        _store_choice(key, best.engine, candidates)
    assert best.compiled is not None
    best.compiled.note = f"auto: chose {best.engine} of {summary}"
    return best.compiled


def _error(expected: Any, got: Any) -> float:
    """The largest relative L2 error over the outputs' float tensors (inf where the outputs
    differ in number, shape or integer values)."""
    from graphopt.testing import relative_error

    want = [x for x in torch.utils._pytree.tree_leaves(expected) if isinstance(x, torch.Tensor)]
    have = [x for x in torch.utils._pytree.tree_leaves(got) if isinstance(x, torch.Tensor)]
    if len(want) != len(have) or any(a.shape != b.shape for a, b in zip(want, have)):
        return math.inf
    worst = 0.0
    for a, b in zip(want, have):
        if a.is_floating_point():
            worst = max(worst, relative_error(a, b))
        elif not torch.equal(a, b.to(a.dtype)):
            return math.inf
    return worst


# ---------------------------------------------------------------------------- the disk cache


def _key(gm: torch.fx.GraphModule, cfg: Config) -> str | None:
    if graph_key.cache_root("auto") is None:
        return None
    options = {k: v for k, v in cfg.describe().items() if k not in ("calibration", "verify")}
    header = {
        "key_format": KEY_FORMAT,
        "config": options,
        "versions": _versions(),
        "cpu": _cpu(),
        "candidates": available(),
    }
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        with unset_fake_temporarily():
            return graph_key.graph_digest(gm, header)
    except graph_key.UncacheableGraph as err:
        log.info("graphopt auto: the choice is not cached (%s)", err)
        return None


def _versions() -> dict[str, str]:
    from graphopt.version import __version__

    out = {"graphopt": __version__, "torch": torch.__version__}
    for package in ("onnxruntime", "openvino", "onnx", "onnxscript"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = ""
    return out


def _cpu() -> dict[str, Any]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "")
    except OSError:
        pass
    return {
        "model": model,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def _cached_choice(key: str | None) -> str | None:
    root = graph_key.cache_root("auto")
    if key is None or root is None:
        return None
    path = root / f"{key}.json"
    try:
        engine = json.loads(path.read_text())["engine"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return engine if engine in available() else None


def _store_choice(key: str, engine: str, candidates: list[Candidate]) -> None:
    root = graph_key.cache_root("auto")
    if root is None:
        return
    record = {
        "engine": engine,
        "candidates": [
            {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "compiled"}
            for c in candidates
        ],
    }
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_json(root / f"{key}.json", record)
    except OSError as err:  # a read-only home: measured again next time
        log.warning("graphopt auto: cannot write the choice to %s (%s)", root, err)
