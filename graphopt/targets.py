"""The table of targets: one line per place graphopt's code can run.

Each line names the target (`Config.target`), the class implementing it (a
`graphopt.backends.base.Backend`, imported when the target is first used, so a missing optional
dependency fails only for its own target, naming the pip extra), and what the rest of graphopt
needs to know without importing it: the options it accepts, the artifact format it writes,
where its code runs, and how int8 graphs are shaped for its kernels.

Adding a target is a folder under graphopt/backends/ with its `Backend` and one line in `TARGETS`
(CONTRIBUTING.md walks through it). This module imports nothing of graphopt, so `Config`,
passes and backends can all read it.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Int8Policy:
    """How `quantize="int8"` shapes the QDQ graph for what a target's integer kernels fuse.

    Attributes:
        quantized_outputs: layer kinds ("conv2d", "linear") whose outputs get a quantize of
            their own (onnxruntime fuses dequantize -> conv -> quantize into its integer conv
            only with one; integer-only hardware needs every layer's output scale).
        rescale_ops: adds, concats and average pools get output scales too (integer-only).
        fuse_residual_adds: a residual add right after a conv reads its other operand
            quantized, so the backend fuses the add into the int8 conv (oneDNN's sum post-op).
        saturating_pairs: the kernels multiply u8 x s8 in saturating int16 pairs on x86
            without VNNI, so activations use [0, 127] there (`int8.host_activation_qmax`).
        readers: which readers of a quantized value read its dequantized copy: "layers" (the
            layer it was quantized for), "adds" (and adds), "all" (every reader).
    """

    quantized_outputs: tuple[str, ...] = ()
    rescale_ops: bool = False
    fuse_residual_adds: bool = False
    saturating_pairs: bool = False
    readers: str = "layers"


@dataclass(frozen=True)
class Target:
    """One line of the target table.

    Attributes:
        name: the `Config.target` value.
        backend: "module:Class" of its `graphopt.backends.base.Backend`.
        summary: one line for help texts.
        extra: the pip extra its backend needs (`pip install 'graphopt[extra]'`), or None.
        format: the artifact format `graphopt.export` writes for it, or None.
        runs_here: torch.compile / optimize can run its code in this process (False: export
            only, e.g. cross-compiled code).
        host: its code runs on this machine's CPU (a pipeline stage on the host can use it).
        quantize: the `Config.quantize` values it accepts (None: every one).
        dtypes: the `Config.dtype` values it accepts.
        int8: how int8 graphs are shaped for its kernels.
    """

    name: str
    backend: str
    summary: str
    extra: str | None = None
    format: str | None = None
    runs_here: bool = True
    host: bool = True
    quantize: tuple[str | None, ...] | None = None
    dtypes: tuple[str, ...] = ("float32",)
    int8: Int8Policy = field(default_factory=Int8Policy)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "cpu",
            "graphopt.backends.inductor:InductorBackend",
            "this CPU, through inductor's C++ codegen (the default)",
            dtypes=("float32", "bfloat16", "float16"),
            int8=Int8Policy(fuse_residual_adds=True, saturating_pairs=True, readers="adds"),
        ),
        Target(
            "onnx",
            "graphopt.backends.onnx:OnnxBackend",
            "an ONNX model run by onnxruntime",
            extra="onnx",
            format="onnx",
            int8=Int8Policy(quantized_outputs=("conv2d",), saturating_pairs=True, readers="adds"),
        ),
        Target(
            "openvino",
            "graphopt.backends.openvino:OpenVINOBackend",
            "this CPU, through Intel's OpenVINO runtime (f32; int8 from QDQ graphs)",
            extra="openvino",
            format="openvino",
            quantize=(None, "int8"),
            int8=Int8Policy(quantized_outputs=("conv2d",), saturating_pairs=True, readers="adds"),
        ),
        Target(
            "auto",
            "graphopt.backends.auto:AutoBackend",
            "the fastest engine here (inductor, onnxruntime, OpenVINO), measured per graph",
            quantize=(None, "int8"),
            # one QDQ graph for every candidate: shaped as onnxruntime and OpenVINO fuse it,
            # which inductor's int8 lowering takes too
            int8=Int8Policy(quantized_outputs=("conv2d",), saturating_pairs=True, readers="adds"),
        ),
        Target(
            "llvm",
            "graphopt.backends.tvm.target:TVMBackend",
            "x86 CPUs, through Apache TVM",
            extra="tvm",
            format="tvm",
        ),
        Target(
            "aarch64",
            "graphopt.backends.tvm.target:TVMBackend",
            "ARM CPUs, cross-compiled by Apache TVM (export only)",
            extra="tvm",
            format="tvm",
            runs_here=False,
            host=False,
        ),
        Target(
            "cuda",
            "graphopt.backends.tvm.target:TVMBackend",
            "NVIDIA GPUs, through Apache TVM",
            extra="tvm",
            format="tvm",
            host=False,
        ),
        Target(
            "xla",
            "graphopt.backends.xla.target:XLABackend",
            "XLA devices through JAX: the CPU here, a TPU or GPU where JAX has one (StableHLO)",
            extra="xla",
            format="stablehlo",
            dtypes=("float32", "bfloat16", "float16"),
        ),
        Target(
            "hls",
            "graphopt.backends.hls.target:HLSBackend",
            "FPGAs: Vitis-HLS C++ (integer-only), run here as its C simulation",
            format="hls",
            quantize=("int8",),
            int8=Int8Policy(
                quantized_outputs=("conv2d", "linear"), rescale_ops=True, readers="all"
            ),
        ),
    )
}

FORMATS: tuple[str, ...] = tuple(dict.fromkeys(t.format for t in TARGETS.values() if t.format))


def target(name: str) -> Target:
    """The table line of `name`, or a ValueError listing the targets."""
    if name not in TARGETS:
        raise ValueError(f"graphopt option 'target' got {name!r}; accepted values: {list(TARGETS)}")
    return TARGETS[name]


def targets_of_format(format: str) -> list[str]:
    """The targets whose artifacts are of `format` (the first is the format's default)."""
    if format not in FORMATS:
        raise ValueError(f"graphopt.export format {format!r}; accepted formats: {list(FORMATS)}")
    return [t.name for t in TARGETS.values() if t.format == format]


def backend(name: str) -> Any:
    """The `Backend` of target `name` (imported on first use).

    Raises:
        ValueError: an unknown target.
        RuntimeError: its optional dependency is not installed (names the pip extra).
    """
    return _backend(target(name).name)


@functools.cache
def _backend(name: str) -> Any:
    line = TARGETS[name]
    module_name, cls_name = line.backend.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if line.extra is None:
            raise
        raise RuntimeError(
            f"target={name!r} needs graphopt's {line.extra!r} extra: "
            f"pip install 'graphopt[{line.extra}]' ({err})"
        ) from err
    return getattr(module, cls_name)(line)
