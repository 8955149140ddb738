"""Data-parallel training: `python -m benchmarks.train` writes benchmarks/RESULTS-train.md.

DistributedDataParallel training steps (forward, backward with the gradient all-reduce, SGD
step) on `--ranks` gloo processes of one thread each, for ResNet-18 (224x224 images) and a
BERT-base-sized encoder (transformers `BertForSequenceClassification`, 12 layers, hidden 768;
random weights, nothing downloaded), side by side in one set of processes:

  eager      DistributedDataParallel(model)
  inductor   torch.compile(ddp)                       (dynamo's DDPOptimizer, inductor)
  graphopt   torch.compile(ddp, backend="graphopt")   (DDPOptimizer, graphopt's pieces)

Every runner starts from the same weights; they take turns in `--rounds` interleaved rounds
(each round: `--warmup` untimed steps, then `--steps` timed ones; the first round also
compiles), and the table gives each runner's median step time over all timed steps, as
steps/s and samples/s (all ranks), its ratio to eager's and inductor's, its compile time, and
the bytes each rank all-reduces per step (counted through DDP's default all-reduce hook,
`graphopt.distributed.count_allreduce_bytes`). Run nothing else meanwhile.

    python -m benchmarks.train                               # both models, 2 ranks
    python -m benchmarks.train --models resnet18 --steps 5 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import unittest.mock
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = Path(__file__).resolve().parent
RUNNERS = ("eager", "inductor", "graphopt")
BATCH = {"resnet18": 4, "bert-base": 2}  # per rank
SEQUENCE = 128


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        from benchmarks.models import ResNet18

        return ResNet18()
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(config)


def _batch(name: str, rank: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    n = BATCH[name]
    if name == "resnet18":
        return {"x": torch.randn(n, 3, 224, 224, generator=g)}, torch.randint(
            0, 1000, (n,), generator=g
        )
    ids = torch.randint(0, 30522, (n, SEQUENCE), generator=g)
    return {"input_ids": ids}, torch.randint(0, 2, (n,), generator=g)


def _loss(name: str, call: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> Any:
    if name == "resnet18":
        return torch.nn.functional.cross_entropy(call(inputs["x"]), labels)
    return call(input_ids=inputs["input_ids"], labels=labels).loss


def _step(name: str, run: dict[str, Any], inputs: dict[str, torch.Tensor], labels: Any) -> None:
    run["opt"].zero_grad()
    _loss(name, run["call"], inputs, labels).backward()
    run["opt"].step()


def worker(rank: int, world: int, args: argparse.Namespace, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    import graphopt  # noqa: F401 - registers the backend
    from graphopt.distributed import count_allreduce_bytes

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    results: dict[str, dict[str, Any]] = {}
    for name in args.models.split(","):
        inputs, labels = _batch(name, rank)
        runs = {}
        for runner in args.runners.split(","):
            model = _model(name).train()
            ddp = DDP(model)
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
            call = ddp if runner == "eager" else torch.compile(ddp, backend=runner)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            runs[runner] = {"call": call, "opt": optimizer, "times": [], "compile": 0.0}

        order = list(runs)
        for round_ in range(args.rounds):
            for runner in order[round_ % len(order) :] + order[: round_ % len(order)]:
                run = runs[runner]
                start = time.perf_counter()
                with _generated_code() as code:
                    for _ in range(args.warmup):
                        _step(name, run, inputs, labels)
                if round_ == 0:
                    run["compile"] = time.perf_counter() - start
                    run["code"] = code
                with count_allreduce_bytes() as sent:
                    for _ in range(args.steps):
                        dist.barrier()
                        start = time.perf_counter()
                        _step(name, run, inputs, labels)
                        run["times"].append(time.perf_counter() - start)
                run["bytes"] = sent["bytes"] // args.steps
                if rank == 0:
                    print(
                        f"[{name}] round {round_} {runner}: "
                        f"{statistics.median(run['times']) * 1e3:.0f} ms/step",
                        flush=True,
                    )
        results[name] = {
            r: {
                "step_s": statistics.median(run["times"]),
                "compile_s": run["compile"],
                "bytes": run["bytes"],
                "code": sorted(run["code"]),
            }
            for r, run in runs.items()
        }
        del runs
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@contextlib.contextmanager
def _generated_code() -> Iterator[set[str]]:
    """Hashes of the Python modules inductor loads meanwhile (each compiled graph's wrapper
    with its C++ kernels, whether compiled now or found in inductor's caches), less their
    first line (`# AOT ID: ['3_forward']`, a counter of the process's graphs). Two runners
    with the same hashes run the same generated code."""
    from torch._inductor.codecache import PyCodeCache

    keys: set[str] = set()
    load = PyCodeCache.load_by_key_path

    def recording(key: str, path: str, *args: Any, **kwargs: Any) -> Any:
        source = Path(path).read_text()
        keys.add(
            hashlib.sha256(re.sub(r"^# AOT ID.*\n", "", source, flags=re.M).encode()).hexdigest()
        )
        return load(key, path, *args, **kwargs)

    with unittest.mock.patch.object(PyCodeCache, "load_by_key_path", recording):
        yield keys


def measure(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {runner: {"step_s", "compile_s", "bytes"}}} from `args.ranks` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "results.pt")
        torch.multiprocessing.spawn(
            worker, args=(args.ranks, args, f"file://{tmp}/store", saved), nprocs=args.ranks
        )
        return torch.load(saved)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,bert-base")
    parser.add_argument("--runners", default=",".join(RUNNERS))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-train.md")
    return parser


def table(results: dict[str, dict[str, dict[str, float]]], world: int) -> str:
    lines = [
        "| model | runner | step ms | steps/s | samples/s | vs eager | vs inductor "
        "| warm-up + compile s | all-reduced per rank per step MB | generated code |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, runs in results.items():
        for runner, r in runs.items():
            samples = BATCH[name] * world / r["step_s"]
            lines.append(
                f"| {name} | {runner} | {r['step_s'] * 1e3:.0f} | {1 / r['step_s']:.2f} "
                f"| {samples:.1f} | {runs['eager']['step_s'] / r['step_s']:.2f}x "
                f"| {runs['inductor']['step_s'] / r['step_s']:.2f}x | {r['compile_s']:.0f} "
                f"| {r['bytes'] / 1e6:.1f} | {_code_column(runner, r, runs['inductor'])} |"
            )
    return "\n".join(lines)


def _code_column(runner: str, run: dict[str, Any], inductor: dict[str, Any]) -> str:
    if runner == "eager":
        return ""
    if runner == "inductor":
        return f"{len(run['code'])} modules"
    return "the same as inductor's" if run["code"] == inductor["code"] else "other modules"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    unknown = set(args.models.split(",")) - set(BATCH)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; models: {sorted(BATCH)}")
    if set(args.runners.split(",")) != set(RUNNERS):
        raise SystemExit(f"the table compares all runners: --runners {','.join(RUNNERS)}")
    results = measure(args)
    command = "python -m benchmarks.train " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        "# Data-parallel training: DDP steps (`benchmarks/train.py`)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Date: {datetime.date.today()}, host: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}; {args.ranks} gloo ranks of 1 thread",
        "",
        f"Per rank: ResNet-18 {BATCH['resnet18']} images of 224x224, BERT-base "
        f"{BATCH['bert-base']} sequences of {SEQUENCE} tokens; SGD with momentum. Step = "
        "forward, backward (gradients all-reduced in DDP's buckets), optimizer step; medians "
        f"of {args.steps} timed steps in each of {args.rounds} interleaved rounds (each round "
        "starts with the next runner). Generated code: the Python modules (wrapper and C++ "
        "kernels) inductor loaded for the runner, compared by the hash of their source. Warm-up + "
        "compile: the first round's untimed steps; graphopt compiles after inductor in the "
        "same processes, so inductor's caches may serve it part of its compile.",
        "",
        table(results, args.ranks),
        "",
    ])  # fmt: skip
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
