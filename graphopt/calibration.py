"""Calibration batches fitted to the graph they calibrate: one rule for every entry point.

Calibration data is rarely shaped like the inputs a graph was traced for: a model exported for
batch 1 and calibrated on batches of 32, or compiled on serving batches of 100 and calibrated
on batches of 32. Dims the graph traced as dynamic take any size. A static batch dim (dim 0)
that differs is re-batched: each calibration batch is cut into pieces of the graph's batch
size along dim 0, the last piece filled up with rows from the batch's start, so every row is
seen and nothing is dropped. Any other static dim that differs (a sequence length, an image
size) cannot be fixed without changing what is computed: `fit_batches` raises a ValueError
that names the batch, the input, both shapes and what to do. (The torch.export entry points
avoid that for lengths: `graphopt.frontend.capture` traces such dims dynamic.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) else None


def _batched_inputs(example: Sequence[Any], batch: Sequence[Any], b: int) -> list[int]:
    """Indices of the inputs of `batch` that differ from the graph's only in a static dim 0
    (all by the same size); raises ValueError for any other difference."""
    batched, sizes = [], set()
    for i, (want, got) in enumerate(zip(example, batch)):
        if not isinstance(want, torch.Tensor):
            continue
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        traced = tuple(want.shape)
        static = [_static(d) for d in want.shape]
        if not isinstance(got, torch.Tensor) or got.dim() != len(static):
            raise ValueError(
                f"calibration batch {b} input {i} is {shape}, the graph's input {i} is "
                f"{_describe(traced)}: give batches with the same inputs as the example"
            )
        differ = [d for d, (s, n) in enumerate(zip(static, got.shape)) if s is not None and s != n]
        if not differ:
            continue
        if differ != [0]:
            raise ValueError(
                f"calibration batch {b} input {i} is {shape}, the graph was traced for "
                f"{_describe(traced)}: only the batch dim (dim 0) is re-batched; give batches "
                f"whose dims {[d for d in differ if d]} match, or trace with those dims dynamic "
                "(torch.export's dynamic_shapes, or torch.compile(..., dynamic=True))"
            )
        batched.append(i)
        sizes.add(got.shape[0])
    if len(sizes) > 1:
        raise ValueError(
            f"calibration batch {b}: inputs {batched} have different batch sizes "
            f"{sorted(sizes)}; each batch's inputs must share dim 0"
        )
    return batched


def _describe(shape: tuple[Any, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def fit_batches(example: Sequence[Any], batches: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """`batches` (values for a graph's inputs, one list per batch) as batches the graph traced
    for `example` (its input values or fake tensors; SymInt dims are dynamic) runs: batches
    that fit as they are, others re-batched along a static dim 0 (see the module docstring).

    Raises:
        ValueError: a batch that cannot be fitted, named with what to change.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # real data, also when called inside torch.compile
        return _fit(example, batches)


def _fit(example: Sequence[Any], batches: Sequence[Sequence[Any]]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for b, batch in enumerate(batches):
        batch = list(batch)
        if len(batch) != len(example):
            raise ValueError(
                f"calibration batch {b} has {len(batch)} inputs, the graph takes {len(example)}"
            )
        batched = _batched_inputs(example, batch, b)
        if not batched:
            out.append(batch)
            continue
        rows = batch[batched[0]].shape[0]
        size = example[batched[0]].shape[0]
        if rows == 0:
            raise ValueError(f"calibration batch {b} is empty (dim 0 of input {batched[0]} is 0)")
        for start in range(0, rows, size):
            # The last piece (or a batch smaller than the graph's) wraps around to the start.
            index = torch.arange(start, start + size) % rows
            piece = list(batch)
            for i in batched:
                piece[i] = batch[i].index_select(0, index)
            out.append(piece)
    return out
