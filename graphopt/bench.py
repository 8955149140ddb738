"""Side-by-side timing: interleaved rounds in one process, medians and ratios."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Seconds between timed calls. Thread pools spin for a while after a call before they sleep
# (OpenMP's in torch, onnxruntime's, TVM's), and on a 2-core host a call timed while another
# engine's threads still spin runs on one core: the pause lets them go to sleep first.
SETTLE_S = 0.05


# At or above this share of CPU time stolen by a hypervisor, timings are flagged as suspect.
STOLEN_WARN = 0.02


def cpu_steal(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(stolen, total) CPU time so far, in ticks summed over all CPUs, from Linux's /proc/stat.
    "steal" is time a virtual machine's CPUs were ready to run while the hypervisor ran
    something else: a sign of a neighbour's load that the guest can read, though not of every
    kind (a neighbour sharing the caches or memory bandwidth shows none). None where there is
    no such file."""
    try:
        with open(path) as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    ticks += [0] * (8 - len(ticks))  # user nice system idle iowait irq softirq steal
    return ticks[7], sum(ticks)


def stolen_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float:
    """The share of CPU time stolen between two `cpu_steal()` readings (nan without both)."""
    if before is None or after is None or after[1] <= before[1]:
        return math.nan
    return (after[0] - before[0]) / (after[1] - before[1])


def stolen_suspect(share: float) -> bool:
    """Whether a stolen share (from `stolen_share`) makes the timings it covers suspect."""
    return share >= STOLEN_WARN


class StolenTime:
    """`with StolenTime() as stolen:` around a timing; then `stolen.share` is the share of CPU
    time the hypervisor took meanwhile (nan off Linux) and `stolen.suspect` whether it reached
    STOLEN_WARN."""

    share: float = math.nan

    def __enter__(self) -> StolenTime:
        self._before = cpu_steal()
        return self

    def __exit__(self, *exc: object) -> None:
        self.share = stolen_share(self._before, cpu_steal())

    @property
    def suspect(self) -> bool:
        return stolen_suspect(self.share)

    def warning(self) -> str:
        return (
            f"the hypervisor took {self.share:.0%} of the CPU time while timing: "
            "another virtual machine's load slowed some calls, so these timings are suspect"
        )


@dataclass
class Timing:
    name: str
    median_ms: float  # nan when the runner has no samples (it failed or was not timed)
    samples_ms: list[float]

    @classmethod
    def from_samples(cls, name: str, samples_ms: list[float]) -> Timing:
        return cls(name, statistics.median(samples_ms) if samples_ms else math.nan, samples_ms)


def compare_speed(
    runners: Mapping[str, Callable[..., Any]],
    inputs: Sequence[Any],
    *,
    rounds: int = 20,
    warmup: int = 3,
    max_rounds: Mapping[str, int] | None = None,
    max_warmup: Mapping[str, int] | None = None,
    settle_s: float = SETTLE_S,
) -> list[Timing]:
    """Time each runner on `inputs`, interleaved in a shuffled order each round, so drift hits
    all alike; each timed call comes `settle_s` after the previous one, so that no engine's
    threads still spin from its own call while another is timed.

    The first entry is the baseline that `format_timings` reports ratios against.
    `max_rounds` / `max_warmup` cap a slow runner: it takes part in only the first N rounds.
    """
    max_rounds, max_warmup = max_rounds or {}, max_warmup or {}
    sync = _synchronize(inputs)
    with torch.no_grad():
        for name, fn in runners.items():
            for _ in range(min(warmup, max_warmup.get(name, warmup))):
                fn(*inputs)
        samples: dict[str, list[float]] = {name: [] for name in runners}
        order = list(runners.items())
        shuffle = random.Random(0).shuffle
        for i in range(rounds):
            shuffle(order)
            for name, fn in order:
                if i >= max_rounds.get(name, rounds):
                    continue
                sync()
                time.sleep(settle_s)
                start = time.perf_counter()
                fn(*inputs)
                sync()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return [Timing.from_samples(name, s) for name, s in samples.items()]


def _synchronize(inputs: Sequence[Any]) -> Callable[[], None]:
    """What waits for queued GPU work: a call returns before its CUDA kernels finish, so a
    timing on CUDA inputs stops only after torch.cuda.synchronize() (a no-op on the CPU)."""
    devices = {t.device for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda}
    if not devices:
        return lambda: None

    def sync() -> None:
        for device in devices:
            torch.cuda.synchronize(device)

    return sync


def format_timings(
    timings: Sequence[Timing],
    *,
    ratios_to: Sequence[str] | None = None,
    columns: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """A markdown table: median ms, speed relative to each of `ratios_to` (default: the first
    row), then the `columns` given as {header: {runner name: text}}. Untimed rows show "-"."""
    by_name = {t.name: t.median_ms for t in timings}
    ratios_to = list(ratios_to or [timings[0].name])
    columns = columns or {}
    headers = ["runner", "median ms", *(f"speed vs {r}" for r in ratios_to), *columns]
    lines = ["| " + " | ".join(headers) + " |", "|---|---:|" + "---:|" * len(ratios_to)]
    lines[1] += "---|" * len(columns)
    for t in timings:
        ok = not math.isnan(t.median_ms)
        cells = [t.name, f"{t.median_ms:.3f}" if ok else "-"]
        for r in ratios_to:
            base = by_name.get(r, math.nan)
            cells.append(f"{base / t.median_ms:.2f}x" if ok and not math.isnan(base) else "-")
        cells += [col.get(t.name, "") for col in columns.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
