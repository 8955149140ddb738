"""Export models every way graphopt can, and record where each artifact ran and how far its
outputs are from eager (graphopt.export runs every artifact it writes; see manifest.json).

python -m benchmarks.export_check                   # tiny-cnn, tiny-bert, every way
python -m benchmarks.export_check --models resnet18,mobilenet_v2 --ways onnx-fp32,tvm-x86
python -m benchmarks.export_check --models tiny-cnn,tiny-bert,resnet18,mobilenet_v2,bert-base \
    --skip bert-base:tvm-aarch64,bert-base:tvm-aarch64-int8 --out benchmarks/RESULTS-export.md

A way that cannot be built or run here is a row that says why, not a crash.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import graphopt
from benchmarks.models import MODELS, TINY, BenchModel
from benchmarks.run import machine_description

WAYS: dict[str, dict[str, Any]] = {
    "onnx-fp32": {"format": "onnx"},
    "onnx-int8": {"format": "onnx", "quantize": "int8"},
    "tvm-x86": {"format": "tvm", "target": "llvm"},
    "tvm-x86-int8": {"format": "tvm", "target": "llvm", "quantize": "int8"},
    "tvm-aarch64": {"format": "tvm", "target": "aarch64"},
    "tvm-aarch64-int8": {"format": "tvm", "target": "aarch64", "quantize": "int8"},
    "tvm-cuda": {"format": "tvm", "target": "cuda"},
}


def check(model: BenchModel, way: str, folder: Path) -> list[str]:
    """One table row: export `model` the `way`, and what its manifest says about the run."""
    options = dict(WAYS[way])
    if options.get("quantize"):
        options["calibration"] = model.calibration()
    torch._dynamo.reset()
    start = time.perf_counter()
    try:
        exported = graphopt.export(
            model.make(), model.inputs(), folder / f"{model.name}-{way}", progress=False, **options
        )
    except Exception as err:  # noqa: BLE001 - a row that says why
        first = (str(err).strip().splitlines() or [""])[0][:160]
        return [model.name, way, f"failed: {type(err).__name__}: {first}", "", "", "", "", ""]
    seconds = time.perf_counter() - start
    manifest = exported.manifest
    size = sum(f["bytes"] for f in manifest["files"].values()) / 1e6
    verification = manifest["verification"]
    if not verification["ran"]:
        ran = f"not run: {verification['reason']}"
        if "nvcc" in manifest.get("tvm", {}):
            ran += f"; nvcc: {manifest['tvm']['nvcc']}"
        return [model.name, way, ran, f"{seconds:.1f}", f"{size:.2f}", "-", "-", "-"]
    return [
        model.name,
        way,
        verification["ran"],
        f"{seconds:.1f}",
        f"{size:.2f}",
        f"{verification['relative_error_vs_graph']:.2e}",
        f"{verification['max_abs_error_vs_eager']:.2e}",
        f"{verification['relative_error_vs_eager']:.2e}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(TINY), help=f"from {list(MODELS)}")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"from {list(WAYS)}")
    parser.add_argument(
        "--skip", default="", help="model:way pairs not to try, e.g. bert-base:tvm-aarch64"
    )
    parser.add_argument("--out", help="also write the table (with the machine) to this file")
    args = parser.parse_args(argv)
    names, ways = args.models.split(","), args.ways.split(",")
    skip = set(filter(None, args.skip.split(",")))
    for name, known in [*((n, MODELS) for n in names), *((w, WAYS) for w in ways)]:
        if name not in known:
            parser.error(f"unknown {name!r}; accepted: {list(known)}")
    header = [
        "model",
        "artifact",
        "ran (at export, on the example input)",
        "export s",
        "MB",
        "relative error vs graphopt's graph",
        "max abs error vs eager",
        "relative error vs eager",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="graphopt-export-check-") as tmp:
        for name in names:
            for way in ways:
                if f"{name}:{way}" in skip:
                    row = [name, way, "not tried (--skip)", "", "", "", "", ""]
                else:
                    row = check(MODELS[name], way, Path(tmp))
                lines.append("| " + " | ".join(row) + " |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print()
    print(table)
    if args.out:
        command = "python -m benchmarks.export_check " + shlex.join(argv or sys.argv[1:])
        text = "\n\n".join(
            [
                "# graphopt export: where each artifact ran, and its error",
                machine_description(command),
                "Each artifact was run by graphopt.export on the model's example input and "
                "compared with graphopt's optimized graph run by PyTorch (the export fails "
                "otherwise). int8 rows are calibrated on 4 random batches: their error against "
                "eager is what int8 costs on random weights and inputs, not an accuracy figure. "
                "`export s` includes that run (untuned TVM, and qemu for aarch64).",
                table,
            ]
        )
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
