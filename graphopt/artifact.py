"""`graphopt.export` and `graphopt.load`: deployable artifacts from the same pass pipeline.

    export(model, example_inputs, out_dir, format="onnx" | "tvm" | "hls", target=..., **options)
        -> Exported (the folder, its manifest and the report)
    load(out_dir) -> Artifact (callable like the model; every file's sha256 is checked first)

An artifact folder holds:
    manifest.json  what is in it: files with sha256 and size, graphopt/torch/tvm/onnx versions,
                   the options, input and output specs (name, dtype, shape; a dynamic dim by
                   its Dim name), the pytree specs to call it like the model, CPU features it
                   needs, and how it was verified when it was written
    model.onnx     format="onnx": the optimized graph (fp32, or int8 as QuantizeLinear/
                   DequantizeLinear), checked by onnx.checker
    model.so       format="tvm": a shared library with the weights embedded; its Relax VM
                   function "main" takes the model's inputs only and returns a tuple
    firmware/ ...  format="hls": a Vitis-HLS-style C++ project (backends/hls/project.py):
                   firmware/, tb/csim.cpp, Makefile, build_prj.tcl, config.json,
                   estimates.json, tb_input.txt/tb_output.txt
    report.json    what each pass did (`graphopt.Report`)
Nothing is pickled: JSON, ONNX protobuf and a shared library.

Writes are atomic: the folder is built as a hidden sibling and renamed into place, so a failed
export leaves nothing behind; an existing folder is replaced only with `overwrite=True`, and
only once the new one is complete.

Every artifact is run before the export returns, on the example inputs, and compared with
graphopt's optimized graph run by PyTorch (int8: see `_verify` for the tolerance):
ONNX in onnxruntime, x86 TVM in process, aarch64 TVM under qemu-aarch64 with the runner in
backends/tvm/runner (when the cross tools are installed), CUDA on a GPU when there is one, and
otherwise its kernels compiled with nvcc. The manifest says which of these ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from graphopt.capture import CapturedGraph, capture_export
from graphopt.compiler import new_report, record_captured, record_optimized
from graphopt.config import Config
from graphopt.errors import UnsupportedOpError, VerificationError
from graphopt.passes.base import count_call_nodes
from graphopt.pipeline import run_graph, run_pipeline
from graphopt.report import PartitionRecord, Report, op_histogram
from graphopt.testing import QUANTIZED_RELATIVE_ERROR, compare_outputs, relative_error

log = logging.getLogger("graphopt")

FORMATS = ("onnx", "tvm", "hls")
TVM_TARGETS = ("llvm", "aarch64", "cuda")
MANIFEST = "manifest.json"
ARTIFACT_VERSION = 1  # bump when the folder layout or the manifest's meaning changes
_MODEL_FILE = {"onnx": "model.onnx", "tvm": "model.so", "hls": "firmware/model.cpp"}
INT8_RUNS_APART = 1.5  # an int8 artifact vs the int8 graph, in units of int8's error (_verify)


@dataclass(frozen=True)
class Exported:
    """What `export` wrote: the folder, its manifest (as written) and the pipeline's report."""

    path: Path
    manifest: dict[str, Any]
    report: Report


def export(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    out_dir: str | os.PathLike[str],
    format: str = "onnx",
    *,
    dynamic_shapes: Any = None,
    tvm_target: dict[str, Any] | None = None,
    hls_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> Exported:
    """Optimize `model` with graphopt's passes and write it as a deployable artifact folder.

    Args:
        model: an nn.Module in eval mode (its weights go into the artifact).
        example_inputs: a tuple of example positional inputs (their shapes are the artifact's,
            except dims made dynamic by `dynamic_shapes`).
        out_dir: the folder to write; it must not exist unless `overwrite=True`.
        format: "onnx" (model.onnx, run by onnxruntime), "tvm" (model.so, a TVM library) or
            "hls" (an FPGA C++ project, integer-only; needs quantize="int8" and calibration;
            `load` runs its C simulation).
        dynamic_shapes: as in torch.export.export, e.g. {"x": {0: torch.export.Dim("batch")}}:
            those dims stay dynamic in the artifact, named as the Dims are (manifest, ONNX).
        tvm_target: format="tvm": a TVM target (JSON dict) instead of graphopt's default for
            `target`, of the same kind: {"kind": "cuda", "arch": "sm_90"} (default sm_80, or
            the GPU here); {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon",
            "+sve"]} (default +neon; the features go into the manifest and are checked before
            the library runs); {"kind": "llvm", "mcpu": "x86-64-v3"} (default: this CPU).
        hls_options: format="hls": part, clock_ns, io ("array"/"stream"), reuse_factor
            ("auto", an int, or per layer), max_dsp, target_latency_us (see
            `graphopt.backends.hls.HLSOptions`).
        overwrite: replace an existing `out_dir` (after the new folder is complete).
        progress: print what is being done, with elapsed seconds, to stderr.
        **options: fields of `graphopt.Config`. `target`: for format="tvm" "llvm" (x86, the
            default), "aarch64" (cross-compiled) or "cuda"; format="onnx" takes "onnx" only.
            int8 (`quantize="int8"`) needs `calibration` batches: an artifact cannot calibrate
            on its first calls.

    Returns:
        `Exported`: the folder's path, the manifest written and the pipeline's report.

    Raises:
        ValueError: a bad format, target, option, or out_dir that exists.
        UnsupportedOpError: nodes the format cannot express (all listed at once); an artifact
            cannot run pieces in PyTorch, so `fallback` does not apply.
        VerificationError: the artifact's outputs differ from the optimized graph's.
    """
    say = _Progress(progress)
    cfg = _export_config(format, options)
    if tvm_target is not None and format != "tvm":
        raise ValueError(f"tvm_target applies to format='tvm' only, not format={format!r}")
    if hls_options is not None and format != "hls":
        raise ValueError(f"hls_options applies to format='hls' only, not format={format!r}")
    hls = None
    if format == "hls":
        from graphopt.backends.hls import HLSOptions

        hls = HLSOptions.from_dict(hls_options)
    target = _tvm_target(cfg, tvm_target) if format == "tvm" else None
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass overwrite=True to replace it")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    report = new_report(cfg)
    say(f"capturing {type(model).__name__} with torch.export")
    start = time.perf_counter()
    captured = capture_export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    report.capture_seconds = time.perf_counter() - start
    dim_names = _dim_names(model, captured, dynamic_shapes)
    gm = _optimize(captured, cfg, report, say)

    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    temp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary folder
    try:
        start = time.perf_counter()
        build = _write_model(gm, captured, cfg, target, temp, say, dim_names, hls)
        report.lowering_seconds = time.perf_counter() - start
        report.partitions.append(
            PartitionRecord(
                "graph",
                {"onnx": "onnx", "hls": "hls"}.get(cfg.target, f"tvm-{cfg.target}"),
                op_histogram(gm),
                count_call_nodes(gm),
            )
        )
        (temp / "report.json").write_text(report.to_json())
        manifest = _manifest(gm, captured, cfg, target, temp, build, dim_names)
        _write_json(temp / MANIFEST, manifest)
        manifest["verification"] = _verify(temp, cfg, captured, model, example_inputs, gm, say)
        _write_json(temp / MANIFEST, manifest)
        _move_into_place(temp, out, overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    size = sum(entry["bytes"] for entry in manifest["files"].values())
    say(f"wrote {out} ({len(manifest['files'])} files, {size / 1e6:.1f} MB)")
    return Exported(out, manifest, report)


def _export_config(format: str, options: dict[str, Any]) -> Config:
    if format not in FORMATS:
        raise ValueError(f"graphopt.export format {format!r}; accepted formats: {list(FORMATS)}")
    target = options.get("target")
    if format == "hls":
        if target not in (None, "hls"):
            raise ValueError(
                f"format='hls' writes an FPGA C++ project; target={target!r} does not apply "
                "(accepted: 'hls' or leave it out)"
            )
        if options.get("quantize") != "int8":
            raise ValueError(
                "format='hls' computes in integers only: pass quantize='int8' and "
                "calibration=[(x1,), (x2,), ...]"
            )
        options = {**options, "target": "hls"}
    elif format == "onnx":
        if target not in (None, "onnx"):
            raise ValueError(
                f"format='onnx' writes an ONNX file for any runtime; target={target!r} does not "
                "apply (accepted: 'onnx' or leave it out). For a TVM library use format='tvm'."
            )
        options = {**options, "target": "onnx"}
    elif target is None:
        options = {**options, "target": "llvm"}
    elif target not in TVM_TARGETS:
        raise ValueError(
            f"format='tvm' target={target!r}; accepted targets: {list(TVM_TARGETS)} ('llvm' is x86)"
        )
    if options.get("devices") is not None:
        raise ValueError("graphopt.export writes one artifact for one target; drop 'devices'")
    cfg = Config.from_options(options)
    if cfg.needs_calibration and not isinstance(cfg.calibration, tuple):  # batches, not N
        raise ValueError(
            "graphopt.export with quantize='int8' needs calibration data: "
            "calibration=[(x1,), (x2,), ...] (an artifact cannot calibrate on its first calls)"
        )
    return cfg


def _tvm_target(cfg: Config, override: dict[str, Any] | None) -> Any:
    """graphopt's TVM target for cfg.target, or `override` after checking it is of that kind."""
    import tvm

    from graphopt.backends.tvm import target_for

    if override is None:
        return target_for(cfg)
    if not isinstance(override, dict):
        raise ValueError(f"tvm_target must be a dict (TVM target JSON), got {override!r}")
    spec = dict(override)
    if spec.get("kind") == "cuda":
        spec.setdefault("host", {"kind": "llvm"})
    try:
        target = tvm.target.Target(spec)
    except Exception as err:  # noqa: BLE001 - TVM raises its own error types
        raise ValueError(f"tvm_target {override!r} is not a valid TVM target: {err}") from err
    arm = str(target.attrs.get("mtriple", "")).startswith("aarch64")
    kind = {"cuda": "cuda", "aarch64": "llvm", "llvm": "llvm"}[cfg.target]
    if target.kind.name != kind or arm != (cfg.target == "aarch64"):
        raise ValueError(
            f"tvm_target {override!r} does not build for target={cfg.target!r}: it needs kind "
            f"{kind!r}"
            + (" with an aarch64 mtriple" if cfg.target == "aarch64" else "")
            + (" and no aarch64 mtriple" if cfg.target == "llvm" else "")
        )
    return target


def _optimize(
    captured: CapturedGraph, cfg: Config, report: Report, say: _Progress
) -> torch.fx.GraphModule:
    """The pass pipeline on the captured graph; every node must then have a lowering."""
    record_captured(captured.gm, report)
    calibration = None
    if cfg.needs_calibration:
        calibration = [captured.flat_inputs(batch) for batch in cfg.calibration]
        say(f"quantizing to int8, calibrating on {len(calibration)} batches")
    say("running graphopt's passes")
    start = time.perf_counter()
    gm = run_pipeline(
        captured.gm,
        cfg,
        report,
        real_inputs=captured.example_inputs if cfg.verify else None,
        calibration=calibration,
    )
    report.passes_seconds = time.perf_counter() - start
    record_optimized(gm, report)
    if cfg.target in TVM_TARGETS:
        from graphopt.backends.tvm import TVM
        from graphopt.passes.partition import unsupported_nodes

        missing = unsupported_nodes(gm, TVM, cfg)
        if missing:
            raise UnsupportedOpError(
                cfg.target, missing, why="a TVM artifact cannot run them in PyTorch"
            )
    if cfg.target == "hls":
        from graphopt.backends.hls import build_program

        build_program(gm)  # every node it cannot express, at once, before anything is written
    return gm


def _write_model(
    gm: torch.fx.GraphModule,
    captured: CapturedGraph,
    cfg: Config,
    target: Any,
    folder: Path,
    say: _Progress,
    dim_names: dict[str, str],
    hls: Any = None,
) -> dict[str, Any]:
    """Write the model file into `folder`; returns what the manifest records of the build
    (the CPU features an aarch64 library needs, the nvcc check of CUDA kernels, the HLS
    project's estimates and C simulation)."""
    if cfg.target == "hls":
        return _write_hls(gm, captured, cfg, folder, say, hls)
    if cfg.target == "onnx":
        import onnx

        from graphopt.backends.onnx import export_onnx

        say("exporting to ONNX (torch.onnx)")
        traced = [n.meta["val"] for n in gm.graph.find_nodes(op="placeholder")]  # symbolic dims
        data = export_onnx(gm, traced, dim_names)
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
        (folder / _MODEL_FILE["onnx"]).write_bytes(data)
        return {}
    from graphopt.backends.tvm import build_relax, compile_relax

    say(f"compiling with TVM for {cfg.target} ({target})")
    executable = compile_relax(build_relax(gm, captured.example_inputs, cfg), cfg, target)
    path = folder / _MODEL_FILE["tvm"]
    build: dict[str, Any] = {"cpu_features": []}
    if cfg.target == "aarch64":
        from graphopt.backends.tvm import aarch64

        aarch64.export_library(executable, path)
        build["cpu_features"] = [str(f).lstrip("+") for f in target.attrs.get("mattr", [])]
        return build
    executable.export_library(str(path))
    if cfg.target == "cuda":
        from graphopt.backends.tvm.lower import compile_cuda_kernels

        try:
            kernels = compile_cuda_kernels(executable, target)
            build["nvcc"] = f"{kernels} kernels compiled to PTX for {target.attrs['arch']}"
        except RuntimeError as err:
            build["nvcc"] = f"not checked: {err}"
            if "not on PATH" not in str(err):
                raise
        say(f"CUDA kernels: {build['nvcc']}")
    return build


def _write_hls(
    gm: torch.fx.GraphModule,
    captured: CapturedGraph,
    cfg: Config,
    folder: Path,
    say: _Progress,
    options: Any,
) -> dict[str, Any]:
    """The HLS project, its estimates, and its C simulation checked bit for bit against
    graphopt's int8 reference on the example inputs and every calibration batch."""
    from graphopt.backends.hls import (
        build_csim,
        compiler_version,
        missing_compiler,
        run_csim,
        run_program,
        write_hls_project,
    )

    batches = [captured.flat_inputs(batch) for batch in cfg.calibration]
    inputs = list(captured.example_inputs)
    if any(x.dim() == 0 for x in inputs):
        raise ValueError("format='hls' needs a batch dim (dim 0) on every input")
    say(f"writing the HLS project (part {options.part}, {options.clock_ns} ns, io={options.io})")
    project = write_hls_project(gm, folder, options, batches, inputs)
    _write_json(folder / "estimates.json", project.estimates)
    _write_json(folder / "config.json", project.config)
    total = project.estimates["total"]
    say(
        f"estimates: {total['dsp']} DSP, {total['bram18']} BRAM18, {total['lut']} LUT, "
        f"latency {total['latency_us']:.3g} us at {options.clock_ns} ns"
    )
    build: dict[str, Any] = {
        "hls": {
            "part": options.part,
            "clock_ns": options.clock_ns,
            "io": options.io,
            "reuse_factors": project.reuse,
            "estimates": total,
        }
    }
    problem = missing_compiler()
    if problem is not None:
        build["hls"]["csim"] = f"not run: {problem}"
        say(build["hls"]["csim"])
        return build
    with tempfile.TemporaryDirectory(prefix="graphopt-csim-") as tmp:
        start = time.perf_counter()
        binary = build_csim(folder, Path(tmp) / "csim")
        built = time.perf_counter() - start
        shapes = [project.program.buffers[n].shape for n in project.program.outputs]
        samples = worst = 0
        start = time.perf_counter()
        for batch in [inputs, *batches]:
            got = run_csim(binary, list(batch), shapes)
            want = run_program(project.program, list(batch))
            samples += batch[0].shape[0]
            for g, w in zip(got, want):
                worst = max(worst, float((g - w).abs().max()) if g.numel() else 0.0)
                if not torch.equal(g, w):
                    raise VerificationError(
                        "hls C simulation",
                        f"differs from graphopt's int8 reference by up to {worst:.3g} "
                        "(it must be bit-exact)",
                    )
        ran = time.perf_counter() - start
    build["hls"]["csim"] = {
        "compiler": compiler_version(),
        "samples": samples,
        "max_abs_difference_vs_int8_reference": worst,
        "build_seconds": round(built, 2),
        "run_seconds": round(ran, 3),
    }
    say(f"C simulation: {samples} samples bit-exact with graphopt's int8 reference")
    return build


def _manifest(
    gm: torch.fx.GraphModule,
    captured: CapturedGraph,
    cfg: Config,
    target: Any,
    folder: Path,
    build: dict[str, Any],
    dim_names: dict[str, str],
) -> dict[str, Any]:
    format = {"onnx": "onnx", "hls": "hls"}.get(cfg.target, "tvm")
    placeholders = gm.graph.find_nodes(op="placeholder")
    outputs = gm.graph.find_nodes(op="output")[0].args[0]
    outputs = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
    manifest: dict[str, Any] = {
        "graphopt_artifact": ARTIFACT_VERSION,
        "format": format,
        "target": cfg.target,
        "model": _MODEL_FILE[format],
        "files": {
            p.relative_to(folder).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        },
        "versions": _versions(format),
        "options": cfg.describe(),
        "inputs": [_spec(n.name, n.meta["val"], dim_names) for n in placeholders],
        "outputs": [_spec(f"output{i}", n.meta["val"], dim_names) for i, n in enumerate(outputs)],
        "in_spec": _dumps(captured.in_spec, "inputs"),
        "out_spec": _dumps(captured.out_spec, "outputs"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if cfg.target == "hls":
        manifest.update(build)
    elif target is not None:
        manifest["tvm"] = {
            "target": _plain(target.export()),
            "entry": "main",
            "runtime": "relax.VirtualMachine",
            **build,
        }
    return manifest


def _dumps(spec: pytree.TreeSpec, what: str) -> str:
    """A pytree spec as JSON (no pickles), or a clear error for a container torch cannot name."""
    try:
        return pytree.treespec_dumps(spec)
    except Exception as err:  # noqa: BLE001 - torch raises several kinds here
        raise ValueError(
            f"the model's {what} use a container type that cannot be written as JSON ({err}); "
            "return tensors, tuples, lists or dicts, or register the type with "
            "torch.utils._pytree.register_pytree_node(..., serialized_type_name=...)"
        ) from err


def _dim_names(
    model: torch.nn.Module, captured: CapturedGraph, dynamic_shapes: Any
) -> dict[str, str]:
    """torch's symbol (s77) -> the user's Dim name (batch) for dims of top-level tensor inputs
    given a named `torch.export.Dim`; other symbols keep their own name."""
    import inspect

    if dynamic_shapes is None:
        return {}
    if isinstance(dynamic_shapes, dict):  # keyed by forward's parameter names
        params = list(inspect.signature(model.forward).parameters)
        per_input = [dynamic_shapes.get(p) for p in params[: len(captured.example_inputs)]]
    else:
        per_input = list(dynamic_shapes)
    placeholders = captured.gm.graph.find_nodes(op="placeholder")
    names: dict[str, str] = {}
    for node, spec in zip(placeholders, per_input):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or spec is None:
            continue
        dims = spec.items() if isinstance(spec, dict) else enumerate(spec)
        for i, dim in dims:
            size = value.shape[i] if 0 <= i < value.dim() else None
            name = getattr(dim, "__name__", None)
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol and name:
                names.setdefault(size.node.expr.name, name)
    return names


def _dim_text(expr: Any, dim_names: dict[str, str]) -> str:
    """A symbolic size as text, with the user's Dim names (s77 * 2 -> batch*2)."""
    import sympy

    renamed = {s: sympy.Symbol(dim_names[s.name]) for s in expr.free_symbols if s.name in dim_names}
    return str(expr.subs(renamed))  # (torch's symbols carry assumptions: match them by name)


def _plain(value: Any) -> Any:
    """TVM's target description (tvm containers inside) as plain JSON values."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or hasattr(value, "__len__"):
        return [_plain(v) for v in value]
    return str(value)


def _spec(name: str, value: Any, dim_names: dict[str, str]) -> dict[str, Any]:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: artifacts take and return tensors, not {type(value).__name__}")
    shape = [
        int(d) if not isinstance(d, torch.SymInt) else _dim_text(d.node.expr, dim_names)
        for d in value.shape
    ]
    return {"name": name, "dtype": str(value.dtype).removeprefix("torch."), "shape": shape}


def _versions(format: str) -> dict[str, str]:
    import graphopt

    versions = {
        "graphopt": graphopt.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    modules = {"onnx": ("onnx", "onnxruntime"), "hls": ()}.get(format, ("tvm", "tvm_ffi"))
    for name in modules:
        module = sys.modules.get(name) or __import__(name)
        versions[name] = str(getattr(module, "__version__", "unknown"))
    return versions


def _verify(
    folder: Path,
    cfg: Config,
    captured: CapturedGraph,
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    gm: torch.fx.GraphModule,
    say: _Progress,
) -> dict[str, Any]:
    """Run the artifact in `folder` on the example inputs (through `load`, as a user would)
    and compare with the optimized graph; a target that cannot run here is checked as far as
    it can be, and the manifest says how far."""
    where = _runs_here(cfg)
    if isinstance(where, dict):  # cannot run here: what was checked instead
        say(f"not run: {where['reason']}")
        return where
    say(f"verifying: running the artifact {where}")
    with torch.no_grad():
        eager = pytree.tree_leaves(model(*example_inputs))
    expected = run_graph(gm, captured.example_inputs)
    expected = list(expected) if isinstance(expected, list | tuple) else [expected]
    got = list(load(folder).run_flat(captured.example_inputs))
    floats = [
        i for i, e in enumerate(eager) if isinstance(e, torch.Tensor) and e.is_floating_point()
    ]

    def worst(a: list[Any], b: list[Any]) -> float:
        return max((relative_error(a[i], b[i]) for i in floats), default=0.0)

    result = {"ran": where, "inputs": "the example inputs"}
    limit = QUANTIZED_RELATIVE_ERROR
    if cfg.quantize is not None:
        # Integer kernels land a value on a rounding boundary one step away from PyTorch's
        # float simulation of the same graph, and deep nets carry those steps, so the artifact
        # and the graph are two int8 runs of one model, each about the int8 error away from
        # float in its own direction: two independent errors of size e differ by about
        # sqrt(2) * e. Measured (random weights): onnxruntime ResNet-18 1.4% from the graph
        # with int8 costing 1.6%, BERT-base 4.0% with 3.7%. A wrong scale or layout is tens
        # of percent off.
        result["int8_graph_relative_error_vs_eager"] = worst(eager, expected)
        limit = max(limit, INT8_RUNS_APART * result["int8_graph_relative_error_vs_eager"])
    problem = compare_outputs(
        tuple(expected), tuple(got), quantized=cfg.quantize is not None, quantized_limit=limit
    )
    if problem is not None:
        raise VerificationError(f"{cfg.target} artifact", problem)
    return {
        **result,
        "compared_with": "graphopt's optimized graph run by PyTorch"
        + (f" (int8: relative error <= {limit:.3g})" if cfg.quantize is not None else ""),
        "max_abs_error_vs_graph": _max_abs(zip(expected, got)),
        "relative_error_vs_graph": worst(expected, got),
        "max_abs_error_vs_eager": _max_abs((eager[i], got[i]) for i in floats),
        "relative_error_vs_eager": worst(eager, got),
    }


def _runs_here(cfg: Config) -> str | dict[str, Any]:
    """How this machine runs an artifact for `cfg.target`, or (a dict) why it cannot and what
    was checked instead."""
    if cfg.target == "onnx":
        return "in onnxruntime (CPU)"
    if cfg.target == "hls":
        from graphopt.backends.hls import missing_compiler

        problem = missing_compiler()
        if problem is not None:
            return {"ran": False, "reason": problem}
        return "in C simulation (g++)"
    if cfg.target == "llvm":
        return "in process (TVM runtime)"
    if cfg.target == "aarch64":
        if platform.machine().lower() in ("aarch64", "arm64"):
            return "in process (TVM runtime)"
        from graphopt.backends.tvm import aarch64

        missing = aarch64.missing_tools()
        if missing:
            return {"ran": False, "reason": f"no aarch64 emulator here: missing {missing}"}
        return "under qemu-aarch64 (backends/tvm/runner)"
    import tvm

    if tvm.cuda(0).exist:
        return "on the GPU (TVM runtime)"
    return {"ran": False, "reason": "no CUDA GPU here"}


def _max_abs(pairs: Any) -> float:
    worst = 0.0
    for e, g in pairs:
        if isinstance(e, torch.Tensor) and e.numel():
            diff = (e.detach().double() - g.detach().double()).abs().max()
            worst = max(worst, float(diff))
    return worst


def _move_into_place(temp: Path, out: Path, overwrite: bool) -> None:
    if not out.exists():
        temp.rename(out)
        return
    if not overwrite:
        raise ValueError(f"{out} appeared while exporting; pass overwrite=True to replace it")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        temp.rename(out)
    except OSError:
        old.rename(out)  # put the previous artifact back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled, self.start = enabled, time.perf_counter()

    def __call__(self, message: str) -> None:
        log.info("graphopt export: %s", message)
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"graphopt export [{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Loading


class Artifact:
    """An exported artifact loaded for running: call it like the original model.

    Attributes:
        path: the folder.
        manifest: its manifest.json.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], run: Callable[..., Any]):
        self.path, self.manifest, self._run = path, manifest, run
        self._in_spec = pytree.treespec_loads(manifest["in_spec"])
        self._out_spec = pytree.treespec_loads(manifest["out_spec"])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self._in_spec:
            raise TypeError(f"{self.path} was exported for inputs {self._in_spec}, got {spec}")
        return pytree.tree_unflatten(list(self.run_flat(flat)), self._out_spec)

    def run_flat(self, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        """Run on the flat list of input tensors (manifest["inputs"] order); a tuple out."""
        specs = self.manifest["inputs"]
        if len(inputs) != len(specs):
            raise TypeError(f"{self.path} takes {len(specs)} inputs, got {len(inputs)}")
        sizes: dict[str, int] = {}
        for value, spec in zip(inputs, specs):
            _check_input(value, spec, sizes)
        return tuple(self._run(*inputs))

    def __repr__(self) -> str:
        m = self.manifest
        return f"Artifact({str(self.path)!r}, format={m['format']!r}, target={m['target']!r})"


def _check_input(value: Any, spec: dict[str, Any], sizes: dict[str, int]) -> None:
    name = spec["name"]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"input {name!r} must be a torch.Tensor, got {type(value).__name__}")
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype != spec["dtype"] or value.dim() != len(spec["shape"]):
        raise ValueError(
            f"input {name!r} is {dtype}{list(value.shape)}, the artifact takes "
            f"{spec['dtype']}{spec['shape']}"
        )
    for got, want in zip(value.shape, spec["shape"]):
        if isinstance(want, int) and got != want or sizes.setdefault(str(want), got) != got:
            raise ValueError(
                f"input {name!r} has shape {list(value.shape)}, the artifact takes "
                f"{spec['shape']} (named dims must agree across inputs: {sizes})"
            )


def load(path: str | os.PathLike[str]) -> Artifact:
    """Load an artifact folder written by `export` and return a callable that runs it.

    Every file's sha256 is checked against manifest.json first. ONNX runs in onnxruntime;
    TVM libraries in TVM's Relax VM (x86 and CUDA in process; an aarch64 library on an x86
    host under qemu-aarch64, when installed).

    Raises:
        ValueError: not an artifact folder, a file missing or changed, or a newer layout.
        RuntimeError: the artifact cannot run on this machine (the message says why).
    """
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{folder} is not a graphopt artifact (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path} is not valid JSON: {err}") from err
    version = manifest.get("graphopt_artifact") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or version > ARTIFACT_VERSION:
        raise ValueError(
            f"{manifest_path}: artifact layout {version!r} is not one this graphopt reads "
            f"(it reads 1..{ARTIFACT_VERSION})"
        )
    for name, entry in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{folder}: {name} is missing (listed in {MANIFEST})")
        if file_sha256(file) != entry["sha256"]:
            raise ValueError(f"{folder}: {name} does not match its sha256 in {MANIFEST}")
    model = folder / manifest["model"]
    if manifest["format"] == "hls":
        return Artifact(folder, manifest, _hls_runner(folder, manifest))
    if manifest["format"] == "onnx":
        from graphopt.backends.onnx import OnnxRunner

        return Artifact(folder, manifest, OnnxRunner(str(model)))
    return Artifact(folder, manifest, _tvm_runner(model, manifest))


def _hls_runner(folder: Path, manifest: dict[str, Any]) -> Callable[..., Any]:
    """Build the project's C simulation (in a temporary folder) and run it."""
    from graphopt.backends.hls import csim_runner, temporary_build_dir

    shapes = [tuple(spec["shape"][1:]) for spec in manifest["outputs"]]
    return csim_runner(folder, shapes, temporary_build_dir("graphopt-csim-"))


def _aarch64_runner(
    library: Path, features: list[str], arm_host: bool
) -> Callable[..., Any] | None:
    """On an x86 host, a function running the aarch64 library under qemu (the runner checks
    the features); on an ARM host None (run it in process), after checking this CPU has the
    library's features: an illegal instruction would kill the process."""
    from graphopt.backends.tvm import aarch64

    if arm_host:
        missing = aarch64.missing_cpu_features(features)
        if missing:
            raise RuntimeError(
                f"{library} was built for {', '.join('+' + f for f in missing)} but this CPU "
                f"does not have {', '.join(missing)}"
            )
        return None

    def run_under_qemu(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        arrays = [a.detach().cpu().contiguous().numpy() for a in args]
        outputs = aarch64.run_library(library, arrays, require=features)
        return tuple(torch.from_numpy(o) for o in outputs)

    return run_under_qemu


def _tvm_runner(library: Path, manifest: dict[str, Any]) -> Callable[..., Any]:
    import tvm
    from tvm import relax

    from graphopt.backends.tvm import CompiledSubgraph

    built_with = manifest["versions"].get("tvm")
    if built_with != tvm.__version__:
        log.warning(
            "graphopt: %s was built with TVM %s, this is TVM %s",
            library,
            built_with,
            tvm.__version__,
        )
    target = manifest["target"]
    inputs = len(manifest["inputs"])
    if target == "aarch64":
        arm_host = platform.machine().lower() in ("aarch64", "arm64")
        runner = _aarch64_runner(library, manifest["tvm"]["cpu_features"], arm_host)
        if runner is not None:
            return runner
    if target == "cuda" and not tvm.cuda(0).exist:
        raise RuntimeError(f"{library} is a CUDA library and this machine has no CUDA GPU")
    if target == "llvm":
        built_for = manifest["tvm"]["target"].get("mcpu")
        here = tvm.target.Target.from_device(tvm.cpu()).attrs.get("mcpu")
        if built_for and built_for != here and not str(built_for).startswith("x86-64"):
            log.warning(
                "graphopt: %s was compiled for x86 CPU %s, this one is %s: it fails if it uses "
                "instructions this CPU lacks (re-export on this machine to be sure)",
                library,
                built_for,
                here,
            )
    device = tvm.cuda(0) if target == "cuda" else tvm.cpu()
    executable = relax.VMExecutable(tvm.runtime.load_module(str(library)))
    return CompiledSubgraph(executable, device, tensor_inputs=[True] * inputs)
