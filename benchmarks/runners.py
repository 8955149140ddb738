"""The engines the suite compares: each builder turns an eval model into a callable.

A builder may be lazy (torch.compile compiles on the first call); the suite times the
builder and the first call together as "compile".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Runner = Callable[..., Any]
Builder = Callable[[nn.Module, tuple[torch.Tensor, ...], str], Runner]


def eager(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
    return model


def inductor_freezing(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
    """torch.compile's default backend with `freezing=True` (a global switch, read at compile)."""
    import torch._inductor.config

    compiled = torch.compile(model)

    def first_call_freezes(*args):
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args)

    return _first_call_then(first_call_freezes, compiled)


def onnxruntime_cpu(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
    """torch.onnx.export (the dynamo exporter: the TorchScript one fails on GPT-2's aten::diff),
    then an onnxruntime session on the CPU execution provider with all graph optimizations."""
    import onnxruntime as ort

    path = os.path.join(workdir, "model.onnx")
    torch.onnx.export(model, inputs, path, dynamo=True, verbose=False)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle onnxruntime threads spin by default: in interleaved rounds on a small machine they
    # steal the cores of the runner timed next (ResNet-18 on 2 cores: inductor after it ran 2x
    # slower). Measured without spinning, every runner gets the machine to itself.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args):
        outputs = session.run(None, {n: a.numpy() for n, a in zip(names, args)})
        return (
            torch.from_numpy(outputs[0])
            if len(outputs) == 1
            else tuple(map(torch.from_numpy, outputs))
        )

    return run


def relax_dynamo(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
    """TVM's own torch.compile backend (`tvm.relax.frontend.torch.relax_dynamo`), default
    pipeline."""
    from tvm.relax.frontend.torch import relax_dynamo as backend

    return torch.compile(model, backend=backend())


def graphopt(target: str, **options: Any) -> Builder:
    def build(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
        return torch.compile(model, backend="graphopt", options={"target": target, **options})

    build.__doc__ = f"torch.compile(backend='graphopt', options={{'target': {target!r}, ...}})"
    return build


def _first_call_then(first: Runner, rest: Runner) -> Runner:
    """Call `first` once (the compiling call), then `rest` without the wrapper's overhead."""
    state = {"fn": first}

    def run(*args):
        fn = state["fn"]
        state["fn"] = rest
        return fn(*args)

    return run


def graphopt_int8(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
    """graphopt target="cpu" with int8 post-training quantization, calibrated on the input."""
    return graphopt("cpu", quantize="int8", calibration=[inputs])(model, inputs, workdir)


# Name -> builder, in table order. "eager" first: every ratio is against it.
RUNNERS: dict[str, Builder] = {
    "eager": eager,
    "inductor": inductor_freezing,
    "onnxruntime": onnxruntime_cpu,
    "relax_dynamo": relax_dynamo,
    "graphopt-cpu": graphopt("cpu"),
    "graphopt-llvm": graphopt("llvm"),
    "graphopt-cpu-int8": graphopt_int8,
    "graphopt-cpu-pruned": graphopt("cpu", sparsity=0.5, structured=True),
}
# The fastest of these is the bar graphopt has to beat.
ANCHORS = ("inductor", "onnxruntime")
