"""Export the quickstart's ResNet-style model as deployable artifacts, load each back, check it
against eager and time it.

python examples/export_artifacts.py                    # ONNX fp32 + int8, TVM x86, StableHLO
                                                       # (CPU and TPU), in ./artifacts
python examples/export_artifacts.py --aarch64          # also a TVM library for 64-bit ARM, run
                                                       # under qemu-aarch64 (Debian packages
                                                       # g++-aarch64-linux-gnu, qemu-user-static)
python examples/export_artifacts.py --out /tmp/a --rounds 5

Each folder holds manifest.json (files with sha256, versions, options, input/output specs),
the model (model.onnx, model.so, or model.stablehlo with weights.safetensors) and
report.json; `graphopt.load(folder)` checks the hashes and returns a callable. See README "Export".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import graphopt
from graphopt.bench import compare_speed, format_timings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import make_model  # noqa: E402 - the quickstart's model, written once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="artifacts", help="folder for the artifact folders")
    parser.add_argument("--aarch64", action="store_true", help="also export for 64-bit ARM")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = make_model()
    x = torch.randn(1, 3, 96, 96)
    calibration = [(torch.randn(1, 3, 96, 96),) for _ in range(4)]  # use real data for accuracy
    exports = {
        "onnx-fp32": {"format": "onnx"},
        "onnx-int8": {"format": "onnx", "quantize": "int8", "calibration": calibration},
        "tvm-x86": {"format": "tvm", "target": "llvm"},
        "stablehlo": {"format": "stablehlo", "platforms": ("cpu", "tpu")},  # run here in JAX
    }
    if args.aarch64:
        exports["tvm-aarch64"] = {"format": "tvm", "target": "aarch64"}

    runners = {"eager": model}
    with torch.no_grad():
        expected = model(x)
    for name, options in exports.items():
        exported = graphopt.export(model, (x,), Path(args.out) / name, overwrite=True, **options)
        check = exported.manifest["verification"]
        artifact = graphopt.load(exported.path)
        error = (artifact(x) - expected).abs().max().item()
        files = ", ".join(
            f"{f} {e['bytes'] / 1e6:.2f} MB" for f, e in exported.manifest["files"].items()
        )
        print(f"{name}: {exported.path} ({files})")
        print(f"  verified when written: {json.dumps(check)}")
        print(f"  loaded again: max abs error vs eager {error:.2e}")
        if name != "tvm-aarch64":  # under an emulator its speed means nothing
            runners[name] = artifact
    print()
    print(format_timings(compare_speed(runners, (x,), rounds=args.rounds)))


if __name__ == "__main__":
    main()
