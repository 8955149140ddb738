"""Pipeline stages in one process, side by side: `python -m benchmarks.stages` (see --help).

ResNet-18 split by graphopt's cost model over each device list given, timed in interleaved
rounds against eager on the CPU, with each split's plan (stages, backends, imbalance) and its
max error against eager. On a machine with a GPU:

    python -m benchmarks.stages --devices "cpu,cuda:0;cuda:0" --batch 8
"""

from __future__ import annotations

import argparse
import time

import torch

import graphopt
from benchmarks.models import ResNet18
from graphopt.bench import compare_speed, format_timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__)
    parser.add_argument(
        "--devices", default="cpu,cpu", help='device lists, ";" between lists, "," within one'
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, x = ResNet18().eval(), torch.rand(args.batch, 3, 224, 224)
    runners = {"eager-cpu": model}
    for spec in args.devices.split(";"):
        devices = [d.strip() for d in spec.split(",") if d.strip()]
        start = time.perf_counter()
        staged = graphopt.optimize(model, (x,), devices=devices)
        with torch.no_grad():
            error = (staged(x) - model(x)).abs().max().item()
        print(f"{devices}: compile {time.perf_counter() - start:.1f} s, max abs error {error:.1e}")
        print(staged.report.stages, flush=True)
        runners["+".join(devices)] = staged
    print(format_timings(compare_speed(runners, (x,), rounds=args.rounds, warmup=2)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
