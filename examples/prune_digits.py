"""Structured pruning on real data: train a small CNN on scikit-learn's digits, remove half of
its channels with graphopt, win the accuracy back by distillation, then quantize to int8.

python examples/prune_digits.py                    # 50% of the channels, 400 recovery steps
python examples/prune_digits.py --model mlp --sparsity 0.75 --steps 600

Needs scikit-learn (for its bundled digits data): pip install -c constraints.txt scikit-learn
"""

from __future__ import annotations

import argparse
import time

import torch

import graphopt
from graphopt.bench import compare_speed, format_timings

try:
    from examples import int8_digits as digits
except ImportError:  # run as a script from examples/ or the project root
    import int8_digits as digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    train_data, test_data = digits.load_digits_split()
    start = time.perf_counter()
    model = digits.DigitsCNN() if args.model == "cnn" else digits.DigitsMLP()
    model = digits.train(model, train_data)
    print(f"trained a {args.model} in {time.perf_counter() - start:.1f}s")

    # 1. Prune: a PyTorch module with smaller, trainable weights (batch dim left dynamic).
    example = (train_data[0][:2],)
    pruned = graphopt.prune(model, example, sparsity=args.sparsity, structured=True)
    print(pruned.report)

    # 2. Recover by distillation from the original, on unlabeled training images.
    images = [train_data[0][i : i + 64] for i in range(0, len(train_data[1]), 64)]
    recovery = graphopt.recover(
        pruned, teacher=model, data=images, steps=args.steps, lr=args.lr, eval_data=test_data
    )
    print(recovery)

    # 3. Compile the pruned model (fp32 and int8) like any other model.
    batch = digits.BATCH
    x = test_data[0][:batch]
    calibration = [(train_data[0][i : i + batch],) for i in range(0, 4 * batch, batch)]
    dense = torch.compile(model, backend="graphopt")
    fast = graphopt.optimize(pruned, (x,))
    fast_int8 = graphopt.optimize(pruned, (x,), quantize="int8", calibration=calibration)
    runs = {"dense": dense, "pruned": fast, "pruned int8": fast_int8}
    for name, fn in runs.items():
        print(f"top-1 on {len(test_data[1])} held-out digits, {name}: "
              f"{digits.accuracy(fn, test_data):.1f}%")  # fmt: skip
    with torch.no_grad():
        timings = compare_speed(runs, (x,), rounds=args.rounds)
    print(format_timings(timings, ratios_to=["dense"]))


if __name__ == "__main__":
    main()
