"""Call overhead of the runtimes graphopt hands graphs to (onnxruntime, OpenVINO, XLA through
JAX): `python -m benchmarks.overhead` writes benchmarks/RESULTS-overhead.md.

Two models, called through each layer between the user and the runtime: one 16x16 linear layer
(batch 1; its compute is negligible, so a call's time is overhead) and MobileNetV2 (224x224,
batch 1; 262 weight tensors, which dynamo's guards and graphopt's weight check visit on every
call). The layers:

  session         the runtime's own call on numpy arrays (onnxruntime `InferenceSession.run`;
                  OpenVINO `InferRequest.infer` with shared inputs, outputs copied; XLA: the
                  compiled executable JAX holds, waited on with `block_until_ready`)
  graphopt runner graphopt's wrapper of it (`OnnxRunner` / `OpenVINORunner` / `XLARunner`):
                  torch tensors in and out (`.numpy()` views in; `torch.from_numpy` out, XLA:
                  DLPack)
  optimize        `graphopt.optimize(...)`: the runner behind the module that flattens the
                  inputs and rebuilds the outputs (pytree)
  torch.compile   `torch.compile(model, backend="graphopt")`: dynamo's frame evaluation and
                  guards (one per weight tensor: dynamo passes the weights as inputs), then
                  graphopt's check that they are the weights it froze (identity and in-place
                  version of each), then graphopt's runner

Each layer's time is the median over `--repeats` repeats (the layers in a shuffled order in
each) of `--calls` calls, in microseconds; the table gives each layer's time and what it adds
to the session's. Run nothing else meanwhile.

    python -m benchmarks.overhead
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = Path(__file__).resolve().parent
LAYERS = ("session", "graphopt runner", "optimize", "torch.compile")
ENGINES = {"onnxruntime": "onnx", "openvino": "openvino", "xla": "xla"}  # engine: its target
LABELS = {"onnxruntime": "onnxruntime", "openvino": "OpenVINO", "xla": "XLA"}


def _layers(engine: str, model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    import graphopt
    from graphopt.backends.onnx import OnnxRunner, export_onnx
    from graphopt.capture import capture_export

    gm = capture_export(model, (x,)).gm
    data = export_onnx(gm, [x])
    array = x.numpy()
    if engine == "onnxruntime":
        runner = OnnxRunner(data)
        session, name = runner.session, runner.input_names[0]

        def call_session() -> Any:
            return session.run(None, {name: array})

    elif engine == "xla":
        import jax

        from graphopt.backends.xla.target import XLARunner
        from graphopt.backends.xla.translate import build_jax
        from graphopt.config import Config

        runner = XLARunner(build_jax(gm, Config(target="xla")))
        runner.compile_for([x])
        executable, params = runner.compiled, runner.params

        def call_session() -> Any:
            with jax.enable_x64(True):
                return executable(params, [array])[0].block_until_ready()

    else:
        from graphopt.backends.openvino import OpenVINORunner, read_onnx

        runner = OpenVINORunner(read_onnx(data))
        request = runner.request

        def call_session() -> Any:
            return request.infer({0: array}, share_inputs=True, share_outputs=False)

    target = ENGINES[engine]
    optimized = graphopt.optimize(model, (x,), target=target)
    compiled = torch.compile(model, backend="graphopt", options={"target": target})
    compiled(x)
    return {
        "session": call_session,
        "graphopt runner": lambda: runner(x),
        "optimize": lambda: optimized(x),
        "torch.compile": lambda: compiled(x),
    }


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "linear":
        return torch.nn.Linear(16, 16).eval(), torch.randn(1, 16)
    from benchmarks.models import MobileNetV2

    return MobileNetV2().eval(), torch.randn(1, 3, 224, 224)


MODELS = {"linear": 1.0, "mobilenet_v2": 0.02}  # name: share of --calls it makes per repeat


def _calls(calls: int, model_name: str) -> int:
    return max(1, int(calls * MODELS[model_name]))


def measure(calls: int, repeats: int, model_name: str = "linear") -> dict[str, dict[str, float]]:
    """{engine: {layer: microseconds a call}}."""
    model, x = _model(model_name)
    calls = _calls(calls, model_name)
    out: dict[str, dict[str, float]] = {}
    shuffle = random.Random(0).shuffle
    with torch.no_grad():
        for engine in ENGINES:
            layers = _layers(engine, model, x)
            samples: dict[str, list[float]] = {name: [] for name in layers}
            order = list(layers.items())
            for _ in range(repeats):
                shuffle(order)  # no layer always runs after another
                for name, fn in order:
                    for _ in range(10):
                        fn()
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    samples[name].append((time.perf_counter() - start) / calls * 1e6)
            out[engine] = {name: statistics.median(s) for name, s in samples.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-overhead.md")
    args = parser.parse_args(argv)
    results = {name: measure(args.calls, args.repeats, name) for name in MODELS}
    command = "python -m benchmarks.overhead " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    rows = [
        "| model | layer | " + " | ".join(f"{LABELS[e]} us | added" for e in ENGINES) + " |",
        "|---|---|" + "---:|---:|" * len(ENGINES),
    ]
    for name, by_engine in results.items():
        for layer in LAYERS:
            cells = []
            for engine in ENGINES:
                us = by_engine[engine][layer]
                cells += [f"{us:.1f}", f"{us - by_engine[engine]['session']:+.1f}"]
            rows.append(f"| {name} | {layer} | " + " | ".join(cells) + " |")
    text = "\n".join([
        "# Call overhead of onnxruntime, OpenVINO and XLA under graphopt "
        "(`benchmarks/overhead.py`)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Date: {datetime.date.today()}, host: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "Microseconds a call through each layer, median of "
        f"{args.repeats} interleaved repeats of {args.calls} calls (MobileNetV2: "
        f"{_calls(args.calls, 'mobilenet_v2')}); `added` is beyond the runtime's own session "
        "call. Issue #32's bar (onnxruntime, OpenVINO): at most 300 us beyond the session under "
        "torch.compile.",
        "",
        *rows,
        "",
    ])  # fmt: skip
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
