"""A model split into pipeline stages by graphopt's cost model, run on torch.distributed (gloo).

python examples/pipeline_gloo.py                       # spawns 2 processes itself
torchrun --nproc-per-node 2 examples/pipeline_gloo.py  # or let torchrun launch them
python examples/pipeline_gloo.py --stages 3 --model resnet18 --batch 16 --microbatches 4
python examples/pipeline_gloo.py --train 5 --svg split.svg   # 5 training steps (1F1B)

Each process runs one stage (GPipe schedule, CPU, gloo); rank 0 feeds the batch, the last rank
checks the output against the whole model run in one process and prints the throughput of the
one-process run (all threads) against the pipeline (one thread per process). With --train N,
the pipeline then takes N SGD steps with the 1F1B schedule on a fixed random batch and labels
(cross-entropy), and the last rank prints the loss of each step. --svg writes the split graph
as a picture.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build(name: str) -> torch.nn.Module:
    """ResNet-18, or a small ResNet (six residual blocks) of its basic blocks."""
    from benchmarks.models import BasicBlock, ResNet18

    torch.manual_seed(0)
    if name == "resnet18":
        return ResNet18().eval()
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        BasicBlock(32, 32), BasicBlock(32, 32), BasicBlock(32, 64, 2), BasicBlock(64, 64),
        BasicBlock(64, 128, 2), BasicBlock(128, 128),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 10),
    ).eval()  # fmt: skip


def input_for(name: str, batch: int) -> torch.Tensor:
    size = 224 if name == "resnet18" else 32
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def worker(rank: int, world: int, args: argparse.Namespace, init: str | None) -> None:
    import graphopt.distributed as gd

    if init is not None:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    else:  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        dist.init_process_group("gloo")
    torch.set_num_threads(args.threads_per_stage)
    model = build(args.model)
    x = input_for(args.model, args.batch)
    micro = args.batch // args.microbatches
    run = gd.pipeline(model, (x[:micro],), n_microbatches=args.microbatches)
    if rank == 0:
        print(run.plan.describe(), flush=True)
    run(x)  # warm up
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.rounds):
        out = run(x)
    dist.barrier()
    seconds = (time.perf_counter() - start) / args.rounds
    if rank == world - 1:
        with torch.no_grad():
            want = model(x)
        error = float((out - want).abs().max())
        print(f"pipeline of {world} processes: {args.batch / seconds:.1f} samples/s "
              f"({seconds * 1e3:.1f} ms per batch of {args.batch}), max abs error vs the "
              f"model {error:.2e}", flush=True)  # fmt: skip
        if error > 1e-4:
            raise SystemExit(f"pipeline output differs from the model by {error}")
    if args.train:
        train(rank, world, args, model, x, micro)
    dist.destroy_process_group()


def train(rank: int, world: int, args: argparse.Namespace, model, x, micro: int) -> None:
    """SGD steps with the 1F1B schedule: every rank updates its own stage's parameters."""
    import graphopt.distributed as gd

    labels = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(2))
    run = gd.pipeline(
        model, (x[:micro],), args.microbatches, loss_fn=torch.nn.functional.cross_entropy
    )
    optimizer = torch.optim.SGD(run.module.parameters(), lr=0.05, momentum=0.9)
    for step in range(args.train):
        start = time.perf_counter()
        loss = run(x, target=labels) if rank == world - 1 else run(x)
        optimizer.step()
        optimizer.zero_grad()
        if loss is not None:
            print(f"1F1B step {step}: loss {loss.item():.4f} "
                  f"({(time.perf_counter() - start) * 1e3:.0f} ms)", flush=True)  # fmt: skip


def one_process(args: argparse.Namespace) -> None:
    import graphopt.distributed as gd
    from graphopt.passes.partition_stages import plan_svg, split_stages

    model, x = build(args.model), input_for(args.model, args.batch)
    captured, gm, plan = gd.plan_for(model, (x,), args.stages)
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(plan_svg(gm, plan))
        print(f"wrote {args.svg}", flush=True)
    staged = gd.StagedModule(split_stages(gm, plan), ["cpu"] * args.stages)
    with torch.no_grad():
        staged(*captured.flat_inputs((x,)))
        start = time.perf_counter()
        for _ in range(args.rounds):
            staged(*captured.flat_inputs((x,)))
        seconds = (time.perf_counter() - start) / args.rounds
    print(f"one process, {torch.get_num_threads()} threads: {args.batch / seconds:.1f} samples/s "
          f"({seconds * 1e3:.1f} ms per batch of {args.batch})", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["small-resnet", "resnet18"], default="small-resnet")
    parser.add_argument("--stages", type=int, default=2, help="processes (one stage each)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads-per-stage", type=int, default=1)
    parser.add_argument("--train", type=int, default=0, help="then N training steps (1F1B)")
    parser.add_argument("--svg", help="write the split graph (one process's plan) to this file")
    args = parser.parse_args()
    if args.batch % args.microbatches:
        parser.error("--batch must be a multiple of --microbatches")
    if "RANK" in os.environ:  # launched by torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return
    one_process(args)
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/store"
        torch.multiprocessing.spawn(worker, args=(args.stages, args, init), nprocs=args.stages)


if __name__ == "__main__":
    main()
