"""The engines the suite compares: each builder turns an eval model into a callable.

A builder may be lazy (torch.compile compiles on the first call); the suite times the
builder and the first call together as "compile". A builder with a keyword-only `calibration`
parameter (the int8 runners) also gets the model's calibration batches; a `note` attribute on
the runner it returns goes to the table's note column.
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
    return _ort_session(_onnx_export(model, inputs, workdir))


def _onnx_export(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> str:
    path = os.path.join(workdir, "model.onnx")
    torch.onnx.export(model, inputs, path, dynamo=True, verbose=False)
    return path


def _ort_session(path: str) -> Runner:
    import onnxruntime as ort

    from graphopt.backends.onnx import session_options

    # Idle onnxruntime threads spin by default: in interleaved rounds on a small machine they
    # steal the cores of the runner timed next (ResNet-18 on 2 cores: inductor after it ran 2x
    # slower). graphopt's options keep the spinning inside Run(), where it speeds onnxruntime
    # up, and stop it when Run() returns.
    session = ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])
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


def graphopt_optimize(target: str, **options: Any) -> Builder:
    """graphopt.optimize: the export entry (torch.export, passes, lowering), called without
    dynamo. torch.compile's entry checks dynamo's guards on every call (one per parameter
    tensor for a module it inlines): about 1 ms of MobileNetV2's 7-10 ms here."""

    def build(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
        import graphopt

        return graphopt.optimize(model, inputs, target=target, **options)

    build.__doc__ = f"graphopt.optimize(model, inputs, target={target!r}, ...)"
    return build


def graphopt_llvm(tuned: bool) -> Builder:
    """graphopt.optimize(target="llvm"): TVM on this x86 host, with the kernels' schedules from
    this machine's tuning database (`tuned`, written by `python -m benchmarks.tune`) or with
    none (`tune.disabled()` while it compiles: graphopt's default CPU schedules)."""

    def build(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
        import graphopt
        from graphopt.backends.tvm import target_for, tune
        from graphopt.config import Config

        if not tuned:
            with tune.disabled():
                return graphopt.optimize(model, inputs, target="llvm")
        if tune.database_for(target_for(Config(target="llvm"))) is None:
            raise RuntimeError(
                f"no tuning database in {tune.tune_root()} (or GRAPHOPT_TUNE=0): "
                "python -m benchmarks.tune"
            )
        return graphopt.optimize(model, inputs, target="llvm")

    return build


def _first_call_then(first: Runner, rest: Runner) -> Runner:
    """Call `first` once (the compiling call), then `rest` without the wrapper's overhead."""
    state = {"fn": first}

    def run(*args):
        fn = state["fn"]
        state["fn"] = rest
        return fn(*args)

    return run


# ---------------------------------------------------------------- int8
# Every int8 runner takes the same `calibration` batches (BenchModel.calibration: drawn like the
# timed input, other seeds; the suite passes them to builders with a `calibration` parameter).
# On x86 CPUs without VNNI every int8 runner uses the reduced range its own docs recommend
# there (7-bit activations for PT2E and graphopt, 7-bit weights for onnxruntime): u8 x s8
# products summed in pairs saturate int16 otherwise (see graphopt.int8.host_activation_qmax).


def _reduce_range() -> bool:
    from graphopt.int8 import ACT_QMAX, host_activation_qmax

    return host_activation_qmax() < ACT_QMAX


def graphopt_int8(target: str, entry: Callable[..., Builder] = graphopt, **more: Any) -> Builder:
    """graphopt on `target` with int8 post-training quantization (default minmax observer),
    calibrated on the suite's batches ("onnx": the QDQ graph run by onnxruntime), through
    `entry` (torch.compile's `graphopt` or `graphopt_optimize`); `more`: further options
    (e.g. sparsity)."""

    def build(
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        workdir: str,
        *,
        calibration: list[tuple[torch.Tensor, ...]],
    ) -> Runner:
        options = {"quantize": "int8", "calibration": list(calibration), **more}
        return entry(target, **options)(model, inputs, workdir)

    return build


def pt2e_int8(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    workdir: str,
    *,
    calibration: list[tuple[torch.Tensor, ...]],
) -> Runner:
    """torchao PT2E static int8 (X86InductorQuantizer default config: per-tensor uint8
    activations with histogram observers, per-channel int8 weights) on the exported program,
    then torch.compile with inductor's `freezing=True`, which lowers it to oneDNN int8 kernels."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    notes = []
    try:  # non-strict export fails on ResNet ("Input partition has more than one output node")
        exported = torch.export.export(model, inputs, strict=True).module()
    except Exception as err:  # noqa: BLE001 - e.g. a transformers model strict dynamo rejects
        exported = torch.export.export(model, inputs, strict=False).module()
        notes.append(f"non-strict export (strict: {type(err).__name__})")
    reduce_range = _reduce_range()
    config = xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range)
    prepared = prepare_pt2e(exported, xiq.X86InductorQuantizer().set_global(config))
    for batch in calibration:
        prepared(*batch)
    runner = inductor_freezing(convert_pt2e(prepared), inputs, workdir)
    if reduce_range:
        notes.append("reduce_range (no VNNI)")
    runner.note = "; ".join(notes)
    return runner


def onnxruntime_int8(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    workdir: str,
    *,
    calibration: list[tuple[torch.Tensor, ...]],
) -> Runner:
    """onnxruntime static int8: `quantize_static` (QDQ, per-channel int8 weights, uint8
    activations, MinMax calibration, ORT's default op types) on the ONNX file of the fp32
    `onnxruntime` runner after `quant_pre_process`; a session as that runner's."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    source, notes = _quant_pre_process(_onnx_export(model, inputs, workdir))
    names = _onnx_input_names(source)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{n: a.numpy() for n, a in zip(names, b)} for b in calibration])

        def get_next(self):
            return next(self.feeds, None)

    reduce_range = _reduce_range()
    quantized = os.path.join(workdir, "model.int8.onnx")
    quantize_static(
        source,
        quantized,
        Batches(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    runner = _ort_session(quantized)
    runner.note = "; ".join(notes + (["reduce_range (no VNNI)"] if reduce_range else []))
    return runner


def onnxruntime_int8_dynamic(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str
) -> Runner:
    """onnxruntime dynamic int8: `quantize_dynamic` (int8 weights, activations quantized at run
    time, ORT's default op types: Conv, MatMul, Gather, ...): no calibration; the usual int8
    recipe for transformers on onnxruntime."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, notes = _quant_pre_process(_onnx_export(model, inputs, workdir))
    reduce_range = _reduce_range()
    quantized = os.path.join(workdir, "model.int8.onnx")
    quantize_dynamic(source, quantized, reduce_range=reduce_range, weight_type=QuantType.QInt8)
    runner = _ort_session(quantized)
    runner.note = "; ".join(notes + (["reduce_range (no VNNI)"] if reduce_range else []))
    return runner


def _quant_pre_process(path: str) -> tuple[str, list[str]]:
    """onnxruntime's recommended step before quantizing (shape inference, graph cleanup); the
    file itself (and a note) when it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = path.replace(".onnx", ".pre.onnx")
    try:
        quant_pre_process(path, out)
    except Exception as err:  # noqa: BLE001 - optional step: quantize the exported file
        return path, [f"no quant_pre_process ({type(err).__name__})"]
    return out, []


def _onnx_input_names(path: str) -> list[str]:
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


# ---------------------------------------------------------------- pruning
# Structured pruning of 50% of the channels, no fine-tuning: the pruned model computes other
# numbers (its error against eager is large by design); what counts is its speed against the
# dense model and how many weights it keeps (`params_kept` on the runner: conv/linear weights).
PRUNE = {"sparsity": 0.5, "structured": True}


def torch_pruning(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
    """Torch-Pruning (DepGraph, eager modules; `pip install torch-pruning`): MetaPruner with
    GroupMagnitudeImportance(p=2), pruning_ratio 0.5, the last Linear left whole, then
    inductor with freezing: the same recipe graphopt-cpu-pruned runs on the ATen graph."""
    import torch_pruning as tp

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    before = sum(m.weight.numel() for m in layers)
    with torch.enable_grad():  # its dependency graph traces with autograd
        pruner = tp.pruner.MetaPruner(
            model,
            inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.5,
            ignored_layers=[layers[-1]],
        )
        pruner.step()
    runner = inductor_freezing(model, inputs, workdir)
    runner.params_kept = sum(m.weight.numel() for m in layers) / before
    return runner


def inductor_autocast(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
    """inductor with freezing under `torch.autocast("cpu", torch.bfloat16)`: what a PyTorch
    user writes for bfloat16 on a CPU."""
    runner = inductor_freezing(model, inputs, workdir)

    def run(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return runner(*args).float()

    return run


def openvino_runtime(precision: str | None) -> Builder:
    """OpenVINO's runtime on its own conversion (`ov.convert_model` of the PyTorch model),
    latency hint, as many threads as torch. precision None: its default on this CPU (bf16
    where the CPU has AVX512_BF16 or AMX), else e.g. "f32" (INFERENCE_PRECISION_HINT)."""

    def build(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
        import openvino as ov

        converted = ov.convert_model(model, example_input=inputs)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        compiled = ov.Core().compile_model(converted, "CPU", config)
        request = compiled.create_infer_request()

        def run(*args):
            request.infer([a.numpy() for a in args], share_inputs=True)
            return torch.from_numpy(request.get_output_tensor(0).data.copy())

        used = compiled.get_property("INFERENCE_PRECISION_HINT")
        version = ov.__version__.split("-")[0]
        run.note = f"openvino {version}, precision {getattr(used, 'get_type_name', used.__str__)()}"
        return run

    return build


def graphopt_auto(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
    """torch.compile(backend='graphopt', options={'target': 'auto'}), its choice measured in
    this run: the compiling call uses an empty choice cache in the runner's workdir (a later
    process would read the choice from the cache and measure nothing)."""
    compiled = torch.compile(model, backend="graphopt", options={"target": "auto"})
    return _first_call_then(_with_fresh_cache(compiled, workdir), compiled)


def graphopt_auto_int8(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    workdir: str,
    *,
    calibration: list[tuple[torch.Tensor, ...]],
) -> Runner:
    """graphopt_auto with int8 post-training quantization, calibrated on the suite's batches:
    one QDQ graph, measured on inductor, onnxruntime and OpenVINO."""
    options = {"target": "auto", "quantize": "int8", "calibration": list(calibration)}
    compiled = torch.compile(model, backend="graphopt", options=options)
    return _first_call_then(_with_fresh_cache(compiled, workdir), compiled)


def graphopt_auto_optimize(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str
) -> Runner:
    """graphopt.optimize(model, inputs, target="auto"): the choice measured in this run (an
    empty choice cache in the workdir), called without dynamo's per-call guards."""
    import graphopt

    with _fresh_cache(workdir):
        return graphopt.optimize(model, inputs, target="auto")


def graphopt_auto_int8_optimize(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    workdir: str,
    *,
    calibration: list[tuple[torch.Tensor, ...]],
) -> Runner:
    """graphopt_auto_optimize with int8, calibrated on the suite's batches."""
    import graphopt

    with _fresh_cache(workdir):
        return graphopt.optimize(
            model, inputs, target="auto", quantize="int8", calibration=list(calibration)
        )


def _fresh_cache(workdir: str) -> Any:
    """GRAPHOPT_CACHE_DIR in `workdir`: target="auto" finds no choice and measures."""
    import unittest.mock

    fresh = {"GRAPHOPT_CACHE": "1", "GRAPHOPT_CACHE_DIR": os.path.join(workdir, "tvm")}
    return unittest.mock.patch.dict(os.environ, fresh)


def _with_fresh_cache(compiled: Runner, workdir: str) -> Runner:
    def call(*args):
        with _fresh_cache(workdir):
            return compiled(*args)

    return call


def graphopt_xla(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
    """torch.compile(backend='graphopt', options={'target': 'xla'}): the graph as a JAX
    function jitted by XLA on JAX's first device. With JAX's CPU wheel that is XLA:CPU: a
    correctness and overhead figure, not the speed of the TPU or GPU the target is for; the
    note names the platform and the jax version."""
    compiled = graphopt("xla")(model, inputs, workdir)
    try:
        import jax
    except ImportError:  # graphopt's own error on the first call names the pip extra
        return compiled
    compiled.note = f"XLA:{jax.devices()[0].platform.upper()}, jax {jax.__version__}"
    return compiled


def openvino_compile(model: nn.Module, inputs: tuple[torch.Tensor, ...], workdir: str) -> Runner:
    """OpenVINO's own torch.compile backend (`import openvino.torch` registers "openvino"), in
    f32 and with torch's thread count, as `openvino-f32` runs."""
    import openvino.torch  # noqa: F401 - registers the backend

    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    return torch.compile(model, backend="openvino", options={"device": "CPU", "config": config})


# Name -> builder, in table order. "eager" first: every ratio is against it.
RUNNERS: dict[str, Builder] = {
    "eager": eager,
    "inductor": inductor_freezing,
    "onnxruntime": onnxruntime_cpu,
    "relax_dynamo": relax_dynamo,
    "graphopt-cpu": graphopt("cpu"),
    "graphopt-cpu-optimize": graphopt_optimize("cpu"),
    "graphopt-llvm": graphopt_llvm(tuned=False),
    "graphopt-llvm-tuned": graphopt_llvm(tuned=True),
    "graphopt-cpu-int8": graphopt_int8("cpu"),
    "graphopt-cpu-int8-optimize": graphopt_int8("cpu", graphopt_optimize),
    "graphopt-onnx-int8": graphopt_int8("onnx"),
    "graphopt-openvino-int8": graphopt_int8("openvino"),
    "graphopt-auto-int8": graphopt_auto_int8,
    "graphopt-auto-int8-optimize": graphopt_auto_int8_optimize,
    "pt2e-int8": pt2e_int8,
    "onnxruntime-int8": onnxruntime_int8,
    "onnxruntime-int8-dynamic": onnxruntime_int8_dynamic,
    "graphopt-cpu-pruned": graphopt("cpu", **PRUNE),
    "graphopt-cpu-pruned-int8": graphopt_int8("cpu", **PRUNE),
    "graphopt-onnx-pruned": graphopt("onnx", **PRUNE),
    "graphopt-onnx-pruned-int8": graphopt_int8("onnx", **PRUNE),
    "torch-pruning": torch_pruning,
    "graphopt-cuda": graphopt("cuda"),
    "graphopt-cpu-bf16": graphopt("cpu", dtype="bfloat16"),
    "inductor-autocast-bf16": inductor_autocast,
    "openvino": openvino_runtime(None),
    "openvino-f32": openvino_runtime("f32"),
    "openvino-compile": openvino_compile,
    "graphopt-onnx": graphopt("onnx"),
    "graphopt-openvino": graphopt("openvino"),
    "graphopt-xla": graphopt_xla,
    "graphopt-auto": graphopt_auto,
    "graphopt-auto-optimize": graphopt_auto_optimize,
}
# The fastest of these is the bar graphopt has to beat: fp32 runners against ANCHORS, int8
# runners against INT8_ANCHORS (and against graphopt-cpu, the fp32 graphopt they replace).
ANCHORS = ("inductor", "onnxruntime", "openvino-f32", "openvino-compile")
INT8_ANCHORS = ("pt2e-int8", "onnxruntime-int8", "onnxruntime-int8-dynamic")
INT8_RUNNERS = (
    "graphopt-cpu-int8",
    "graphopt-cpu-int8-optimize",
    "graphopt-onnx-int8",
    "graphopt-openvino-int8",
    "graphopt-auto-int8",
    "graphopt-auto-int8-optimize",
    *INT8_ANCHORS,
)
# 16-bit runners, measured against OpenVINO's runtime in its default precision (bf16 on a CPU
# with AVX512_BF16 or AMX) and for top-1 agreement with eager fp32.
HALF_RUNNERS = ("graphopt-cpu-bf16", "inductor-autocast-bf16", "openvino", "openvino-f32")
HALF_ANCHOR = "openvino"
# What runs with `--device cuda` (model and inputs on the GPU): the rest are CPU engines.
CUDA_RUNNERS = ("eager", "inductor", "graphopt-cuda")
PRUNED_RUNNERS = (
    "graphopt-cpu-pruned",
    "graphopt-cpu-pruned-int8",
    "graphopt-onnx-pruned",
    "graphopt-onnx-pruned-int8",
    "torch-pruning",
)
