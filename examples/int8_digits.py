"""int8 post-training quantization on real data: train a small CNN on scikit-learn's digits,
quantize it with graphopt, and compare accuracy and speed with the float model.

python examples/int8_digits.py                     # target="cpu" (oneDNN int8 kernels)
python examples/int8_digits.py --model mlp --observer percentile
python examples/int8_digits.py --accuracy-budget 0.005   # keep the most sensitive layers float

Needs scikit-learn (for its bundled digits data): pip install -c constraints.txt scikit-learn
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import graphopt
from graphopt.bench import compare_speed, format_timings

BATCH = 100


class DigitsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
            nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),  # depthwise
        )  # fmt: skip
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def load_digits_split() -> tuple[
    tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]:
    """((train images, labels), (test images, labels)): 1,297 / 500 of the 1,797 8x8 digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return (x[:1297], y[:1297]), (x[1297:], y[1297:])


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: int = 25) -> nn.Module:
    x, y = data
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(epochs):
        for i in range(0, len(y), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    return model.eval()


def accuracy(fn, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Top-1 accuracy in percent, in batches of BATCH images."""
    x, y = data
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), BATCH):
            correct += int((fn(x[i : i + BATCH]).argmax(1) == y[i : i + BATCH]).sum())
    return 100.0 * correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--target", choices=["cpu", "llvm"], default="cpu")
    parser.add_argument("--observer", choices=["minmax", "percentile"], default="minmax")
    parser.add_argument("--accuracy-budget", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    train_data, test_data = load_digits_split()
    start = time.perf_counter()
    model = train(DigitsCNN() if args.model == "cnn" else DigitsMLP(), train_data)
    print(
        f"trained a {args.model} on {len(train_data[1])} digits "
        f"in {time.perf_counter() - start:.1f}s"
    )

    # Calibration: a few batches shaped like the calls (static shapes), from the training set.
    calibration = [(train_data[0][i : i + BATCH],) for i in range(0, 4 * BATCH, BATCH)]
    options = {"target": args.target, "observer": args.observer}
    fp32 = torch.compile(model, backend="graphopt", options=options)
    int8 = torch.compile(
        model,
        backend="graphopt",
        options={
            **options,
            "quantize": "int8",
            "calibration": calibration,
            "accuracy_budget": args.accuracy_budget,
        },
    )
    results = {
        name: accuracy(fn, test_data)
        for name, fn in [("eager", model), ("graphopt fp32", fp32), ("graphopt int8", int8)]
    }
    print(graphopt.reports()[-1])
    for name, acc in results.items():
        print(f"top-1 on {len(test_data[1])} held-out digits, {name}: {acc:.1f}%")

    x = test_data[0][:BATCH]
    with torch.no_grad():
        timings = compare_speed(
            {"eager": model, "graphopt fp32": fp32, "graphopt int8": int8}, (x,), rounds=args.rounds
        )
    print(format_timings(timings, ratios_to=["eager", "graphopt fp32"]))


if __name__ == "__main__":
    main()
