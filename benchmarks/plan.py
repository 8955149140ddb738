"""The planner's model against measurement: `python -m benchmarks.plan` writes
benchmarks/RESULTS-plan.md.

For ResNet-18 and BERT-base (benchmarks/train.py's models and batches), `graphopt.plan.probe`
measures this CPU (one thread per device: eager training steps, FLOPs counted by
FlopCounterMode, and a two-process gloo all-reduce), the model predicts the step time of 1 and
2 data-parallel replicas, and benchmarks/train.py measures eager DDP steps on that many gloo
ranks of one thread. A 2-core machine has no room for more ranks. Run nothing else meanwhile.

    python -m benchmarks.plan
    python -m benchmarks.plan --models resnet18 --steps 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import train  # noqa: E402
from graphopt import plan  # noqa: E402

HERE = Path(__file__).resolve().parent
LIMIT = 0.25  # the bar: predicted within 25% of measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,bert-base")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-plan.md")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        model = train._model(name).train()
        inputs, labels = train._batch(name, 0)
        positional = tuple(inputs.values())

        def loss_fn(out, name=name, labels=labels):
            if name == "resnet18":
                return torch.nn.functional.cross_entropy(out, labels)
            return torch.nn.functional.cross_entropy(out.logits, labels)

        work = plan.workload(model, positional, loss_fn)
        device = plan.probe(model, positional, loss_fn=loss_fn)
        for ranks in (1, 2):
            options = train.parser().parse_args(
                ["--models", name, "--runners", "eager", "--ranks", str(ranks),
                 "--steps", str(args.steps), "--rounds", "1"]
            )  # fmt: skip
            measured = train.measure(options)[name]["eager"]["step_s"]
            predicted = plan.predicted_step(work, device, ranks)
            rows.append((name, ranks, predicted, measured))
            print(f"{name} x{ranks}: predicted {predicted * 1e3:.0f} ms, measured "
                  f"{measured * 1e3:.0f} ms", flush=True)  # fmt: skip
        rows.append((name, device, work))
    command = "python -m benchmarks.plan " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# The planner's step time against measurement (`benchmarks/plan.py`)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Date: {datetime.date.today()}, host: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}",
        "",
        "Predicted: `graphopt.plan` from `plan.probe` (this CPU, one thread per device). "
        "Measured: eager DDP on gloo ranks of one thread (`benchmarks/train.py`, median of "
        f"{args.steps} steps). Bar: within {LIMIT:.0%}.",
        "",
        "| model | replicas | predicted ms | measured ms | error | within the bar |",
        "|---|---:|---:|---:|---:|---|",
    ]
    probes = []
    for row in rows:
        if len(row) == 3:
            name, device, work = row
            probes.append(
                f"- {name}: a step of batch {work.batch} is {work.flops / 1e9:.1f} GFLOP, "
                f"gradients {work.gradient_bytes / 1e6:.1f} MB; probe: "
                f"{device.flops_per_s / 1e9:.1f} GFLOP/s per thread, all-reduce "
                f"{device.link_bytes_per_s / 1e9:.2f} GB/s"
            )
            continue
        name, ranks, predicted, measured = row
        error = predicted / measured - 1
        lines.append(
            f"| {name} | {ranks} | {predicted * 1e3:.0f} | {measured * 1e3:.0f} | "
            f"{error:+.0%} | {'yes' if abs(error) <= LIMIT else 'no'} |"
        )
    text = "\n".join([*lines, "", *probes, ""])
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
