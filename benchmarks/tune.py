"""Tune the benchmark models' TVM kernels on this machine: `python -m benchmarks.tune`.

Runs `graphopt.tune` (MetaSchedule, target="llvm") on each model's benchmark input, one model
after another, each with its own budget, into the tuning database that later llvm compiles
apply (`$GRAPHOPT_TUNE_DIR`, default ~/.cache/graphopt/tune). Then `python -m benchmarks.run`
times the tuned path as `graphopt-llvm-tuned` next to the untuned `graphopt-llvm`.

    python -m benchmarks.tune --models resnet18,mobilenet_v2,bert-base --budget 600

Run nothing else meanwhile: the candidates are timed on this machine, and a busy machine
makes every measurement (and so the chosen schedules) wrong.
"""

from __future__ import annotations

import argparse
import time

import torch

import graphopt
from benchmarks.models import MODELS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__)
    parser.add_argument("--models", default="resnet18,mobilenet_v2,bert-base")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds per model")
    parser.add_argument("--max-trials", type=int, default=None, help="per model")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    for name in names:
        bench = MODELS[name]
        start = time.perf_counter()
        print(f"== {name}: tuning for {args.budget:g} s", flush=True)
        with torch.no_grad():
            result = graphopt.tune(
                bench.make(), bench.inputs(), budget_s=args.budget, max_trials=args.max_trials
            )
        print(result)
        print(f"== {name}: {time.perf_counter() - start:.0f} s in all\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
