"""The one numerical comparison graphopt uses (tests, `verify=True`, the CLI) and its tolerances."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

# (rtol, atol) per dtype. One table: a test that needs looser numbers says why in its own
# assertion instead of redefining these. fp32 allows for reassociated reductions and folded
# BatchNorm (both change rounding, not results).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
    torch.complex64: (1e-4, 1e-4),
    torch.complex128: (1e-7, 1e-7),
}


# int8 kernels against the int8 graph they were built from (verify=True with quantize="int8"):
# kernels requantize in float or fuse differently, so a value on a rounding boundary may land
# one step (scale) away and carry that into later layers. Compared by relative L2 error.
QUANTIZED_RELATIVE_ERROR = 0.01


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for a dtype; integers and bools compare exactly."""
    if not (dtype.is_floating_point or dtype.is_complex):
        return (0.0, 0.0)
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def compare_outputs(
    expected: Any,
    actual: Any,
    *,
    quantized: bool = False,
    quantized_limit: float = QUANTIZED_RELATIVE_ERROR,
) -> str | None:
    """None if the outputs match (structure, then shape, then dtype, then values), else why not.

    quantized: float values are compared by relative L2 error, up to `quantized_limit`.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # verify=True compares inside torch.compile's fake mode
        return _compare(expected, actual, quantized and quantized_limit)


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (L2 over all elements, in float64)."""
    e, a = expected.detach().double().cpu(), actual.detach().double().cpu()
    den = float(e.norm())
    return float((a - e).norm()) / den if den > 0 else float((a - e).norm())


def _compare(expected: Any, actual: Any, quantized: float | bool = False) -> str | None:
    """quantized: False, or the relative L2 error allowed for float values."""
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    act_leaves, act_spec = pytree.tree_flatten(actual)
    if exp_spec != act_spec:
        # Tuples and lists of tensors are interchangeable at graph boundaries.
        if len(exp_leaves) != len(act_leaves):
            return f"structure differs: expected {exp_spec}, got {act_spec}"
    for i, (e, a) in enumerate(zip(exp_leaves, act_leaves)):
        where = f"output {i}"
        if isinstance(e, torch.Tensor) != isinstance(a, torch.Tensor):
            return f"{where}: expected {type(e).__name__}, got {type(a).__name__}"
        if not isinstance(e, torch.Tensor):
            if e != a:
                return f"{where}: expected {e!r}, got {a!r}"
            continue
        if e.shape != a.shape:
            return f"{where}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
        if e.dtype != a.dtype:
            return f"{where}: dtype {a.dtype} != expected {e.dtype}"
        if quantized and e.dtype.is_floating_point:
            err = relative_error(e, a)
            if not err <= quantized:
                return f"{where}: relative error {err:.4g} > {quantized:.4g} (int8)"
            continue
        rtol, atol = tolerance(e.dtype)
        try:
            torch.testing.assert_close(
                a.detach().cpu(), e.detach().cpu(), rtol=rtol, atol=atol, equal_nan=True
            )
        except AssertionError as err:
            return f"{where}: {err}"
    return None


def assert_same_outputs(expected: Any, actual: Any, inputs: Any = None) -> None:
    """Assert two model outputs agree: pytree structure, shape, dtype, values (exact for ints).

    With `inputs`, `expected` and `actual` are callables run on them first.
    """
    if inputs is not None:
        expected, actual = expected(*inputs), actual(*inputs)
    problem = compare_outputs(expected, actual)
    if problem is not None:
        raise AssertionError(problem)
