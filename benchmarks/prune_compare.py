"""graphopt's structured pruning against Torch-Pruning on the same models:
`python -m benchmarks.prune_compare` (needs `pip install torch-pruning==1.6.1`, not a graphopt
dependency; writes benchmarks/RESULTS-torch-pruning.md).

- digits (scikit-learn, real data): a CNN and an MLP trained here; each tool removes 50% of the
  channels with its L2-magnitude criterion (the last layer left whole), then the same
  `graphopt.recover` distillation (400 steps) fine-tunes each; top-1 before and after.
- ResNet-18 and MobileNetV2 (benchmarks.models, random weights): conv/linear weights kept.
- Which graphs each tool takes: an eager module, a `torch.export` program (its `.module()`),
  a `torch.compile` graph.
Speed is measured by the suite (`python -m benchmarks.run`, runners graphopt-cpu-pruned and
torch-pruning), not here.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphopt  # noqa: E402
from benchmarks.models import MobileNetV2, ResNet18  # noqa: E402
from examples import int8_digits as digits  # noqa: E402

HALF = {"sparsity": 0.5, "structured": True}


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def torch_pruning(model: nn.Module, example: tuple[torch.Tensor, ...]) -> nn.Module:
    """Torch-Pruning's recipe matching graphopt's: L2 group magnitude, 50%, last layer whole."""
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[_layers(model)[-1]],
    )
    pruner.step()
    return model


def _weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in _layers(model))


def _graphopt_weights(pruned: graphopt.OptimizedModule) -> tuple[int, int]:
    layers = pruned.report.pruning.layers
    return sum(x.params_before for x in layers), sum(x.params_after for x in layers)


def digits_rows(steps: int) -> list[str]:
    train, test = digits.load_digits_split()
    images = [train[0][i : i + 64] for i in range(0, len(train[1]), 64)]
    rows = []
    for kind, make in (("cnn", digits.DigitsCNN), ("mlp", digits.DigitsMLP)):
        torch.manual_seed(0)
        teacher = digits.train(make(), train)
        example = (train[0][:2],)
        ours = graphopt.prune(teacher, example, **HALF)
        theirs = torch_pruning(copy.deepcopy(teacher), example)
        before, after = _graphopt_weights(ours)
        kept = {"graphopt": after / before, "Torch-Pruning": _weights(theirs) / _weights(teacher)}
        for name, student in (("graphopt", ours), ("Torch-Pruning", theirs)):
            result = graphopt.recover(
                student, teacher, images, steps=steps, lr=5e-3, eval_data=test, progress=False
            )
            rows.append(
                f"| digits {kind} | {name} | {kept[name]:.1%} | {result.teacher_top1:.1%} | "
                f"{result.top1_before:.1%} | {result.top1_after:.1%} | "
                f"{result.top1_after - result.teacher_top1:+.1%} |"
            )
            print(rows[-1], flush=True)
    return rows


def imagenet_rows() -> list[str]:
    rows = []
    for name, make in (("resnet18", ResNet18), ("mobilenet_v2", MobileNetV2)):
        torch.manual_seed(0)
        model = make().eval()
        x = torch.randn(1, 3, 224, 224)
        ours = graphopt.prune(model, (x,), dynamic_shapes=None, **HALF)
        before, after = _graphopt_weights(ours)
        with torch.enable_grad():
            theirs = torch_pruning(copy.deepcopy(model), (x,))
        rows.append(f"| {name} | {after / before:.1%} | {_weights(theirs) / _weights(model):.1%} |")
        print(rows[-1], flush=True)
    return rows


def graph_rows() -> list[str]:
    """Which capture each tool prunes: eager module, torch.export program, torch.compile graph."""
    from tests.models import ResidualCNN

    model, x = ResidualCNN().eval(), torch.randn(2, 3, 16, 16)
    exported = torch.export.export(model, (x,)).module()
    cells = {}
    for where, target in (("eager module", model), ("torch.export program", exported)):
        try:
            torch_pruning(copy.deepcopy(target), (x,))
            cells[("Torch-Pruning", where)] = "yes"
        except Exception as err:  # noqa: BLE001 - the row records the failure
            cells[("Torch-Pruning", where)] = f"no: {type(err).__name__}: {str(err)[:80]}"
        try:
            graphopt.prune(target, (x,), **HALF)
            cells[("graphopt", where)] = "yes"
        except Exception as err:  # noqa: BLE001
            cells[("graphopt", where)] = f"no: {type(err).__name__}: {str(err)[:80]}"
    graphopt.clear_reports()
    with torch.no_grad():  # inference graphs: training graphs are not pruned
        torch.compile(model, backend="graphopt", options=HALF)(x)
    pruned = [r for r in graphopt.reports() if r.pruning and r.pruning.groups_pruned]
    cells[("graphopt", "torch.compile graph")] = "yes" if pruned else "no"
    cells[("Torch-Pruning", "torch.compile graph")] = "not tried: it takes nn.Module objects"
    rows = []
    for tool in ("graphopt", "Torch-Pruning"):
        where = ("eager module", "torch.export program", "torch.compile graph")
        rows.append(f"| {tool} | " + " | ".join(cells[(tool, w)] for w in where) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    here = os.path.dirname(__file__)
    parser.add_argument("--out", default=os.path.join(here, "RESULTS-torch-pruning.md"))
    args = parser.parse_args()
    import torch_pruning

    parts = [
        "# graphopt vs Torch-Pruning (structured, 50% of the channels)",
        f"`python -m benchmarks.prune_compare --steps {args.steps}`; torch {torch.__version__}, "
        f"torch-pruning {torch_pruning.__version__}. Both: L2 magnitude importance over each "
        "group of coupled channels, 50% per group, the last layer left whole; both recovered "
        f"by the same `graphopt.recover` distillation ({args.steps} steps, lr 5e-3).",
        "## Accuracy on digits (500 held-out images)",
        "| model | tool | conv/linear weights kept | teacher top-1 | pruned top-1 | "
        "after recover | change |",
        "|---|---|---:|---:|---:|---:|---:|",
        *digits_rows(args.steps),
        "## Weights kept (random weights, 224x224)",
        "| model | graphopt | Torch-Pruning |",
        "|---|---:|---:|",
        *imagenet_rows(),
        "## Which graphs each tool prunes (ResNet-style CNN)",
        "| tool | eager module | torch.export program | torch.compile graph |",
        "|---|---|---|---|",
        *graph_rows(),
    ]
    lines, table = [], False
    for part in parts:  # tables are consecutive rows; everything else is a paragraph
        is_row = part.startswith("|")
        if lines and not (is_row and table):
            lines.append("")
        lines.append(part)
        table = is_row
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
