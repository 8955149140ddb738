"""`graphopt.export` and `graphopt.load`: deployable artifacts from the same pass pipeline.

    export(model, example_inputs, out_dir, format="onnx" | "openvino" | "tvm" | "hls", target=...,
           **options)
        -> Exported (the folder, its manifest and the report)
    load(out_dir) -> Artifact (callable like the model; every file's sha256 is checked first)

An artifact folder holds manifest.json (graphopt/manifest.py), report.json (what each pass
did, `graphopt.Report`) and the files its target's backend writes (`Backend.write`):
    model.onnx     format="onnx": the optimized graph (fp32, or int8 as QuantizeLinear/
                   DequantizeLinear), checked by onnx.checker
    model.xml/.bin format="openvino": OpenVINO IR of the same ONNX translation (f32 weights)
    model.so       format="tvm": a shared library with the weights embedded; its Relax VM
                   function "main" takes the model's inputs only and returns a tuple
    firmware/ ...  format="hls": a Vitis-HLS-style C++ project (graphopt/backends/hls/project.py):
                   firmware/, tb/csim.cpp, Makefile, build_prj.tcl, config.json,
                   estimates.json, tb_input.txt/tb_output.txt
Nothing is pickled: JSON, ONNX protobuf, OpenVINO IR and a shared library.

Writes are atomic: the folder is built as a hidden sibling and renamed into place, so a failed
export leaves nothing behind; an existing folder is replaced only with `overwrite=True`, and
only once the new one is complete.

Every artifact is run before the export returns, on the example inputs, and compared with
graphopt's optimized graph run by PyTorch (int8: see `_verify` for the tolerance), where this
machine can run it (`Backend.where_artifact_runs`): ONNX in onnxruntime, x86 TVM in process,
aarch64 TVM under qemu-aarch64 with the runner in graphopt/backends/tvm/runner (when the cross tools
are installed), CUDA on a GPU when there is one, and otherwise its kernels compiled with nvcc;
HLS as its C simulation. The manifest says which of these ran.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from graphopt import targets
from graphopt.backends.base import ExportJob
from graphopt.capture import CapturedGraph
from graphopt.compiler import new_report
from graphopt.config import Config
from graphopt.errors import VerificationError
from graphopt.files import move_into_place, temporary_sibling, write_json
from graphopt.frontend import calibration_batches, optimized_graph
from graphopt.manifest import MANIFEST, Artifact, build_manifest, read_manifest, user_dim_names
from graphopt.passes.base import count_call_nodes
from graphopt.pipeline import run_graph
from graphopt.report import PartitionRecord, Report, op_histogram
from graphopt.testing import QUANTIZED_RELATIVE_ERROR, compare_outputs, relative_error

log = logging.getLogger("graphopt")

FORMATS = targets.FORMATS
INT8_RUNS_APART = 1.5  # an int8 artifact vs the int8 graph, in units of int8's error (_verify)
_FORMAT_OPTIONS = {
    "tvm": "tvm_target",
    "hls": "hls_options",
    "stablehlo": "platforms",
}  # export()'s per-format options


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
    platforms: Sequence[str] | None = None,
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
        format: "onnx" (model.onnx, run by onnxruntime), "openvino" (model.xml/model.bin, run
            by OpenVINO in f32), "stablehlo" (a serialized jax.export program and its weights,
            run by JAX/XLA: CPU, TPU, GPU), "tvm" (model.so, a TVM library) or
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
        platforms: format="stablehlo": the platforms `jax.export` lowers for, any of "cpu",
            "tpu", "cuda", "rocm" (default ("cpu", "tpu")); the artifact runs on each of them.
        overwrite: replace an existing `out_dir` (after the new folder is complete).
        progress: print what is being done, with elapsed seconds, to stderr.
        **options: fields of `graphopt.Config`. `target`: for format="tvm" "llvm" (x86, the
            default), "aarch64" (cross-compiled) or "cuda"; format="onnx" and "openvino" take
            their own target only.
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
    backend = targets.backend(cfg.target)
    given = {"tvm_target": tvm_target, "hls_options": hls_options, "platforms": platforms}
    for name, value in given.items():
        if value is not None and _FORMAT_OPTIONS.get(format) != name:
            raise ValueError(f"{name} applies to format={_format_of(name)!r} only, not {format!r}")
    format_options = backend.export_options(cfg, given.get(_FORMAT_OPTIONS.get(format, "")))
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass overwrite=True to replace it")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    report = new_report(cfg)
    captured, gm = optimized_graph(
        model, example_inputs, cfg, dynamic_shapes=dynamic_shapes, report=report, say=say
    )
    backend.check_export(gm, cfg)  # every node it cannot express, before anything is written
    job = ExportJob(
        gm,
        cfg,
        list(captured.example_inputs),
        calibration_batches(captured, cfg) or [],
        user_dim_names(model, captured, dynamic_shapes),
        format_options,
        say,
    )
    temp = temporary_sibling(out)
    try:
        start = time.perf_counter()
        sections = backend.write(job, temp)
        report.lowering_seconds = time.perf_counter() - start
        report.partitions.append(
            PartitionRecord("graph", backend.label, op_histogram(gm), count_call_nodes(gm))
        )
        (temp / "report.json").write_text(report.to_json())
        manifest = build_manifest(gm, captured, cfg, backend, temp, sections, job.dim_names)
        write_json(temp / MANIFEST, manifest)
        manifest["verification"] = _verify(temp, cfg, captured, model, example_inputs, gm, say)
        write_json(temp / MANIFEST, manifest)
        move_into_place(temp, out, overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    size = sum(entry["bytes"] for entry in manifest["files"].values())
    say(f"wrote {out} ({len(manifest['files'])} files, {size / 1e6:.1f} MB)")
    return Exported(out, manifest, report)


def _format_of(option: str) -> str:
    return next(f for f, name in _FORMAT_OPTIONS.items() if name == option)


def _export_config(format: str, options: dict[str, Any]) -> Config:
    """The Config of an export: `target` must be one of the format's (default: its first)."""
    accepted = targets.targets_of_format(format)
    target = options.get("target")
    if target is None:
        options = {**options, "target": accepted[0]}
    elif target not in accepted:
        own = targets.TARGETS.get(target)
        hint = f" (format={own.format!r} writes {own.summary})" if own and own.format else ""
        raise ValueError(
            f"format={format!r}: target={target!r} does not apply{hint}; accepted targets: "
            f"{accepted} (or leave it out)"
        )
    if options.get("devices") is not None:
        raise ValueError("graphopt.export writes one artifact for one target; drop 'devices'")
    cfg = Config.from_options(options)
    if cfg.needs_calibration and not isinstance(cfg.calibration, tuple):  # batches, not N
        raise ValueError(
            f"graphopt.export with quantize={cfg.quantize!r} needs calibration data: "
            "calibration=[(x1,), (x2,), ...] (an artifact cannot calibrate on its first calls)"
        )
    return cfg


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
    where = targets.backend(cfg.target).where_artifact_runs(cfg)
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


def load(path: str | os.PathLike[str]) -> Artifact:
    """Load an artifact folder written by `export` and return a callable that runs it.

    Every file's sha256 is checked against manifest.json first. ONNX runs in onnxruntime;
    TVM libraries in TVM's Relax VM (x86 and CUDA in process; an aarch64 library on an x86
    host under qemu-aarch64, when installed); an HLS project as its C simulation.

    Raises:
        ValueError: not an artifact folder, a file missing or changed, or a newer layout.
        RuntimeError: the artifact cannot run on this machine (the message says why).
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    target = manifest.get("target")
    if target not in targets.TARGETS or targets.TARGETS[target].format != manifest["format"]:
        raise ValueError(
            f"{folder}: format {manifest['format']!r} for target {target!r} is not one this "
            f"graphopt loads (formats: {list(FORMATS)})"
        )
    return Artifact(folder, manifest, targets.backend(target).load(folder, manifest))


def _max_abs(pairs: Any) -> float:
    worst = 0.0
    for e, g in pairs:
        if isinstance(e, torch.Tensor) and e.numel():
            diff = (e.detach().double() - g.detach().double()).abs().max()
            worst = max(worst, float(diff))
    return worst


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled, self.start = enabled, time.perf_counter()

    def __call__(self, message: str) -> None:
        log.info("graphopt export: %s", message)
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"graphopt export [{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)
