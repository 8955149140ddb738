"""`graphopt.plan`: how to spend hardware on training a model. For each kind of device, every
layout of data-parallel replicas x pipeline stages that fits, with its predicted step time,
memory per device, bytes on the wire and cost; the cheapest that meets a samples/s goal first.

The model (docs/plan.md has it with its checks):

    compute    = F / (throughput x s) x (m + s - 1) / m    F: FLOPs of one training step (forward
                                                           and backward) of one replica's batch;
                                                           s stages, m microbatches: the bubble
    all-reduce = 2 (r - 1) / r x G / s / link               r replicas, G gradient bytes, ring;
                 + 2 (r - 1) x latency x buckets            link: the slowest link the ring crosses
    step       = compute + all-reduce                       (no overlap: an upper bound), or with
                 compute + max(all-reduce - backward,       overlap (the link runs beside the
                               all-reduce / buckets)        backward: GPUs): the last bucket shows
    memory     = G / s x (2 + optimizer states)             weights, gradients, optimizer state
                                                           per device (activations not counted)
    samples/s  = r x batch / step
    cost       = r x s x price per hour / 3600 / samples/s x 1e6   (per million samples)

`probe(...)` measures this machine's throughput on the model itself (a few eager training steps:
FLOPs counted by torch's FlopCounterMode, divided by the measured time) and the all-reduce
bandwidth of two local gloo processes; other devices are declared (`DeviceKind`).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

LossFn = Callable[[Any], torch.Tensor]  # the model's output -> a scalar loss


@dataclass(frozen=True)
class DeviceKind:
    """A kind of device to train on.

    Attributes:
        name: a label ("cpu-1-thread", "a100").
        flops_per_s: the training FLOP/s it reaches on this kind of model (not its peak).
        memory_bytes: memory per device.
        link_bytes_per_s: the all-reduce bus bandwidth between two of them.
        price_per_hour: per device (0: free).
        count: how many there are.
        per_node: devices per machine (0: all on `link_bytes_per_s`); a ring over more than
            one machine runs at `node_link_bytes_per_s` where that is slower.
        node_link_bytes_per_s: the network between machines, per machine.
        latency_s: the time of one ring step besides its bytes (each all-reduce call takes
            2 (r - 1) of them).
        overlap: the all-reduce runs beside the backward (GPUs: NCCL has its own engine; CPU
            ranks sharing their cores: no).
    """

    name: str
    flops_per_s: float
    memory_bytes: float
    link_bytes_per_s: float
    price_per_hour: float = 0.0
    count: int = 1
    per_node: int = 0
    node_link_bytes_per_s: float = 0.0
    latency_s: float = 0.0
    overlap: bool = False

    def __post_init__(self) -> None:
        for key in ("flops_per_s", "memory_bytes", "link_bytes_per_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"DeviceKind {self.name!r}: {key} must be > 0")
        if self.count < 1 or self.price_per_hour < 0:
            raise ValueError(f"DeviceKind {self.name!r}: count >= 1 and price_per_hour >= 0")
        if self.per_node < 0 or self.latency_s < 0:
            raise ValueError(f"DeviceKind {self.name!r}: per_node >= 0 and latency_s >= 0")
        if self.per_node and not self.node_link_bytes_per_s > 0:
            raise ValueError(
                f"DeviceKind {self.name!r}: per_node={self.per_node} needs "
                "node_link_bytes_per_s > 0 (the network between machines)"
            )

    def ring_bytes_per_s(self, devices: int) -> float:
        """The bandwidth of a ring over `devices` of this kind: the slowest link it crosses."""
        if self.per_node and devices > self.per_node:
            return min(self.link_bytes_per_s, self.node_link_bytes_per_s)
        return self.link_bytes_per_s


@dataclass(frozen=True)
class Workload:
    """One replica's training step: its FLOPs, gradient bytes and batch size, and the FLOPs of
    its forward (0: a third of the step's, the backward doing twice the forward's work)."""

    flops: float
    gradient_bytes: int
    batch: int
    forward_flops: float = 0.0

    @property
    def backward_share(self) -> float:
        return 1 - self.forward_flops / self.flops if self.forward_flops else 2 / 3


@dataclass(frozen=True)
class Layout:
    device: str
    replicas: int
    stages: int
    microbatches: int
    compute_s: float
    allreduce_s: float  # what the step waits for (with overlap: less what the backward hides)
    memory_bytes: float
    wire_bytes: float  # all-reduced by each device per step (ring: 2 (r-1)/r of its share)
    samples_per_s: float
    cost_per_million: float
    fits: bool

    @property
    def step_s(self) -> float:
        return self.compute_s + self.allreduce_s

    @property
    def devices(self) -> int:
        return self.replicas * self.stages


@dataclass
class Plan:
    """Every layout considered, cheapest first among those that fit and meet the goal."""

    workload: Workload
    goal_samples_per_s: float | None
    layouts: list[Layout] = field(default_factory=list)

    @property
    def best(self) -> Layout | None:
        """The cheapest layout that fits and meets the goal (the fastest if no goal)."""
        ok = [x for x in self.layouts if x.fits and self._meets(x)]
        return ok[0] if ok else None

    def _meets(self, layout: Layout) -> bool:
        goal = self.goal_samples_per_s
        return goal is None or layout.samples_per_s >= goal

    def __str__(self) -> str:
        w = self.workload
        lines = [
            f"graphopt plan: a training step of batch {w.batch} per replica is "
            f"{w.flops / 1e9:.1f} GFLOP, gradients {w.gradient_bytes / 1e6:.1f} MB"
            + (f"; goal {self.goal_samples_per_s:g} samples/s" if self.goal_samples_per_s else ""),
            f"  {'device':<16}{'replicas':>9}{'stages':>7}{'step ms':>9}{'all-reduce ms':>14}"
            f"{'samples/s':>11}{'memory MB':>11}{'wire MB':>9}{'$/1M samples':>14}  note",
        ]
        for x in self.layouts:
            note = "best" if x is self.best else ("" if x.fits else "does not fit")
            if x.fits and not self._meets(x):
                note = "below the goal"
            lines.append(
                f"  {x.device:<16}{x.replicas:>9}{x.stages:>7}{x.step_s * 1e3:>9.1f}"
                f"{x.allreduce_s * 1e3:>14.1f}{x.samples_per_s:>11.1f}"
                f"{x.memory_bytes / 1e6:>11.0f}{x.wire_bytes / 1e6:>9.1f}"
                f"{x.cost_per_million:>14.2f}  {note}"
            )
        return "\n".join(lines)


def workload(
    model: torch.nn.Module, example_inputs: Sequence[Any], loss_fn: LossFn | None = None
) -> Workload:
    """FLOPs of one eager training step on `example_inputs` (one replica's batch; torch's
    FlopCounterMode over forward and backward) and the model's gradient bytes."""
    from torch.utils.flop_counter import FlopCounterMode

    loss_fn = loss_fn or _default_loss
    counter = FlopCounterMode(display=False)
    with _unchanged(model), counter:
        loss = loss_fn(model(*example_inputs))
        forward = counter.get_total_flops()
        loss.backward()
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    batch = next((x.shape[0] for x in example_inputs if isinstance(x, torch.Tensor)), 1)
    return Workload(float(counter.get_total_flops()), int(grads), int(batch), float(forward))


def layouts_for(
    work: Workload,
    device: DeviceKind,
    *,
    microbatches: int = 4,
    optimizer_states: int = 1,
    bucket_bytes: float = 25e6,
) -> list[Layout]:
    """Every replicas x stages layout of `device` (up to its count), predicted by the model.
    `bucket_bytes`: the gradients all-reduced per call (DDP's `bucket_cap_mb`, 25 MB)."""
    out = []
    for stages in range(1, device.count + 1):
        for replicas in range(1, device.count // stages + 1):
            m = microbatches if stages > 1 else 1
            compute = work.flops / (device.flops_per_s * stages) * (m + stages - 1) / m
            share = work.gradient_bytes / stages
            wire = 2 * (replicas - 1) / replicas * share
            buckets = max(1, math.ceil(share / bucket_bytes))
            ring = device.ring_bytes_per_s(replicas * stages)
            allreduce = wire / ring + 2 * (replicas - 1) * device.latency_s * buckets
            if device.overlap:  # hidden behind the backward, but for the last bucket's
                backward = compute * work.backward_share
                allreduce = max(allreduce - backward, allreduce / buckets)
            memory = share * (2 + optimizer_states)
            samples = replicas * work.batch / (compute + allreduce)
            cost = replicas * stages * device.price_per_hour / 3600 / samples * 1e6
            out.append(
                Layout(
                    device.name,
                    replicas,
                    stages,
                    m,
                    compute,
                    allreduce,
                    memory,
                    wire,
                    samples,
                    cost,
                    fits=memory <= device.memory_bytes,
                )  # fmt: skip
            )
    return out


def plan(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    devices: Sequence[DeviceKind] | None = None,
    goal_samples_per_s: float | None = None,
    loss_fn: LossFn | None = None,
    microbatches: int = 4,
    optimizer_states: int = 1,
    bucket_bytes: float = 25e6,
) -> Plan:
    """The layouts of data-parallel replicas x pipeline stages for training `model` on each
    kind in `devices` (default: this CPU, probed: `probe`), cheapest first among those that fit
    and reach `goal_samples_per_s` (then the rest, fastest first).

    Args:
        example_inputs: one replica's batch (positional inputs of the model).
        loss_fn: the model's output -> a scalar loss (default: its mean, for counting FLOPs).
        optimizer_states: tensors the optimizer keeps per weight (SGD with momentum 1, Adam 2).
        bucket_bytes: gradients per all-reduce call (DDP's `bucket_cap_mb`).
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if goal_samples_per_s is not None and not goal_samples_per_s > 0:
        raise ValueError(f"goal_samples_per_s must be > 0, got {goal_samples_per_s!r}")
    work = workload(model, example_inputs, loss_fn)
    if devices is None:
        devices = [probe(model, example_inputs, loss_fn=loss_fn)]
    result = Plan(work, goal_samples_per_s)
    for device in devices:
        result.layouts += layouts_for(
            work,
            device,
            microbatches=microbatches,
            optimizer_states=optimizer_states,
            bucket_bytes=bucket_bytes,
        )

    def order(x: Layout) -> tuple:
        good = x.fits and result._meets(x)
        return (not good, x.cost_per_million if good else 0.0, -x.samples_per_s)

    result.layouts.sort(key=order)
    return result


def probe(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    loss_fn: LossFn | None = None,
    threads: int = 1,
    steps: int = 3,
) -> DeviceKind:
    """This machine as a `DeviceKind`: one device per `threads` of its CPUs, its training
    FLOP/s on `model` (eager steps with `threads` threads), its memory shared among them, and
    the all-reduce bandwidth of two local gloo processes."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    loss_fn = loss_fn or _default_loss
    work = workload(model, example_inputs, loss_fn)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _unchanged(model):
            loss_fn(model(*example_inputs)).backward()  # warm-up
            start = time.perf_counter()
            for _ in range(steps):
                model.zero_grad(set_to_none=True)
                loss_fn(model(*example_inputs)).backward()
            step = (time.perf_counter() - start) / steps
    finally:
        torch.set_num_threads(before)
    count = max(1, (os.cpu_count() or 1) // threads)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / count
    return DeviceKind(
        f"cpu-{threads}-thread", work.flops / step, memory, allreduce_bandwidth(), 0.0, count
    )


def allreduce_bandwidth(nbytes: int = 1 << 25, repeats: int = 3) -> float:
    """Bus bandwidth of an all-reduce between two local gloo processes (bytes/s): the payload
    times 2 (n - 1) / n = 1 over the median time of `repeats` all-reduces. The processes run
    from a fresh interpreter (`python -m graphopt.plan`), not from the caller's script."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "graphopt.plan", str(nbytes), str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the all-reduce probe failed: {done.stderr[-1000:]}")
    return nbytes / float(done.stdout.split()[-1])


def _allreduce_seconds(nbytes: int, repeats: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds")
        torch.multiprocessing.spawn(
            _allreduce_worker, args=(f"file://{tmp}/store", nbytes, repeats, out), nprocs=2
        )
        with open(out) as f:
            return float(f.read())


def _allreduce_worker(rank: int, init: str, nbytes: int, repeats: int, out: str) -> None:
    import statistics

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    tensor = torch.ones(nbytes // 4)
    dist.all_reduce(tensor)  # warm-up: connections
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(statistics.median(times)))
    dist.destroy_process_group()


@contextlib.contextmanager
def _unchanged(model: torch.nn.Module) -> Iterator[None]:
    """The model as it was afterwards: its buffers (BatchNorm statistics a training step
    updates) and its gradients (none are left behind)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {name: p.grad for name, p in model.named_parameters()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for name, p in model.named_parameters():
            p.grad = grads[name]


def _default_loss(output: Any) -> torch.Tensor:
    leaves = [x for x in torch.utils._pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]
    if not leaves or not leaves[0].is_floating_point():
        raise ValueError("graphopt.plan: pass loss_fn= (the model's output has no float tensor)")
    return leaves[0].float().mean()


def predicted_step(work: Workload, device: DeviceKind, replicas: int) -> float:
    """The step time the model predicts for `replicas` data-parallel replicas, one stage."""
    for x in layouts_for(work, device):
        if x.replicas == replicas and x.stages == 1:
            return x.step_s
    raise ValueError(f"{device.name} has {device.count} devices, not {replicas}")


__all__ = [
    "DeviceKind",
    "Layout",
    "Plan",
    "Workload",
    "allreduce_bandwidth",
    "layouts_for",
    "plan",
    "predicted_step",
    "probe",
    "workload",
]


if __name__ == "__main__":  # the all-reduce probe: python -m graphopt.plan NBYTES REPEATS
    import sys

    print(_allreduce_seconds(int(sys.argv[1]), int(sys.argv[2])))
