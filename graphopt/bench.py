"""Side-by-side timing: interleaved rounds in one process, medians and ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Timing:
    name: str
    median_ms: float
    samples_ms: list[float]


def compare_speed(
    runners: Mapping[str, Callable[..., Any]],
    inputs: Sequence[Any],
    *,
    rounds: int = 20,
    warmup: int = 3,
) -> list[Timing]:
    """Time each runner on `inputs`, interleaving them round by round so drift hits all alike.

    The first entry is the baseline that `format_timings` reports ratios against.
    """
    with torch.no_grad():
        for fn in runners.values():
            for _ in range(warmup):
                fn(*inputs)
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, fn in runners.items():
                start = time.perf_counter()
                fn(*inputs)
                samples[name].append((time.perf_counter() - start) * 1e3)
    return [Timing(name, statistics.median(s), s) for name, s in samples.items()]


def format_timings(timings: Sequence[Timing]) -> str:
    """A markdown table: median ms and speed relative to the first (baseline) row."""
    base = timings[0].median_ms
    lines = ["| runner | median ms | speed vs " + timings[0].name + " |", "|---|---:|---:|"]
    for t in timings:
        lines.append(f"| {t.name} | {t.median_ms:.3f} | {base / t.median_ms:.2f}x |")
    return "\n".join(lines)
