"""Data-parallel training under graphopt: DistributedDataParallel compiled with graphopt, on
scikit-learn's digits, one process per rank (gloo, CPU).

python examples/ddp_digits.py                         # starts 2 processes itself
torchrun --nproc-per-node 2 examples/ddp_digits.py    # or let torchrun start them
python examples/ddp_digits.py --ranks 4 --epochs 5 --fp16-hook
python examples/ddp_digits.py --eager                 # the same without torch.compile

Each rank trains on its half (quarter, ...) of every batch; DDP all-reduces the gradients, so
the replicas stay identical. Rank 0 prints each epoch's loss and samples/s (the first epoch's
includes compiling), the bytes a rank
all-reduced per step (fp16 compression halves them), that the replicas are identical, and the
test accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GLOBAL_BATCH = 64


def worker(rank: int, world: int, args: argparse.Namespace, init: str | None) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from examples.int8_digits import DigitsCNN, accuracy, load_digits_split
    from graphopt.distributed import count_allreduce_bytes

    if init is not None:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    else:  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    (x, y), test = load_digits_split()
    torch.manual_seed(0)
    model = DigitsCNN().train()
    ddp = DDP(model)
    hook = default_hooks.fp16_compress_hook if args.fp16_hook else default_hooks.allreduce_hook
    ddp.register_comm_hook(None, hook)  # (a hook, so that its bytes are counted)
    step = ddp if args.eager else torch.compile(ddp, backend="graphopt")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    share = GLOBAL_BATCH // world
    steps = 0
    with count_allreduce_bytes() as sent:
        for epoch in range(args.epochs):
            start, total = time.perf_counter(), 0.0
            for i in range(0, len(y) - GLOBAL_BATCH + 1, GLOBAL_BATCH):
                mine = slice(i + rank * share, i + (rank + 1) * share)
                optimizer.zero_grad()
                loss = F.cross_entropy(step(x[mine]), y[mine])
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                steps += 1
            seconds = time.perf_counter() - start
            batches = len(y) // GLOBAL_BATCH
            if rank == 0:
                print(
                    f"epoch {epoch}: loss {total / batches:.4f}, "
                    f"{batches * GLOBAL_BATCH / seconds:.0f} samples/s over {world} ranks",
                    flush=True,
                )
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    replicas = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(replicas, weights)
    if rank == 0:
        grads = sum(p.numel() * p.element_size() for p in model.parameters())
        print(
            f"all-reduced per step by each rank: {sent['bytes'] // steps} bytes "
            f"({'fp16' if args.fp16_hook else 'fp32'}; fp32 gradients are {grads} bytes)"
        )
        print(f"replicas identical: {all(torch.equal(r, weights) for r in replicas)}")
        print(f"test accuracy: {accuracy(model.eval(), test):.1f}%")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="processes to start (no torchrun)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fp16-hook", action="store_true", help="all-reduce in fp16")
    parser.add_argument("--eager", action="store_true", help="DDP without torch.compile")
    args = parser.parse_args()
    if GLOBAL_BATCH % args.ranks:
        raise SystemExit(f"--ranks must divide the batch of {GLOBAL_BATCH}")
    if "RANK" in os.environ:  # under torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/store"
        torch.multiprocessing.spawn(worker, args=(args.ranks, args, init), nprocs=args.ranks)


if __name__ == "__main__":
    main()
