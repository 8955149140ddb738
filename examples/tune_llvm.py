"""Tune TVM's x86 kernels for the quickstart model on this machine, then time them.

python examples/tune_llvm.py --budget 300

`graphopt.tune` collects the fused kernels graphopt hands TVM for target="llvm", searches
schedules for them with MetaSchedule for the budget, timing candidates here, and stores the
results in this machine's tuning database (~/.cache/graphopt/tune, or $GRAPHOPT_TUNE_DIR).
Every later llvm compile applies it; tuning again continues from it. The table compares eager,
graphopt with inductor (target="cpu"), and TVM untuned and tuned, in one process.
Run nothing else meanwhile: a busy machine makes every measurement wrong.
"""

import argparse
import sys
from pathlib import Path

import torch

import graphopt
from graphopt.backends.tvm import tune
from graphopt.bench import compare_speed, format_timings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import make_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="tuning seconds")
    parser.add_argument("--max-trials", type=int, default=None, help="stop after N candidates")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = make_model()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        result = graphopt.tune(model, (x,), budget_s=args.budget, max_trials=args.max_trials)
        print(result, "\n")
        with tune.disabled():
            untuned = graphopt.optimize(model, (x,), target="llvm")
        tuned = graphopt.optimize(model, (x,), target="llvm")
        inductor = graphopt.optimize(model, (x,), target="cpu")
        graphopt.testing.assert_same_outputs(model(x), tuned(x))
        print("tuned outputs match eager\n")
    runners = {
        "eager": model,
        "graphopt-cpu": inductor,
        "graphopt-llvm (untuned)": untuned,
        "graphopt-llvm (tuned)": tuned,
    }
    print(format_timings(compare_speed(runners, (x,), rounds=args.rounds)))


if __name__ == "__main__":
    main()
