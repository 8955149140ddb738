"""The one configuration object: every option graphopt accepts is a field of `Config`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

TARGETS = ("cpu", "llvm", "aarch64", "cuda", "hls", "onnx")
QUANTIZE = (None, "int8")
FALLBACKS = ("eager", "error")
OBSERVERS = ("minmax", "percentile")
DEFAULT_CALIBRATION_CALLS = 8


@dataclass(frozen=True)
class Config:
    """Options of `torch.compile(m, backend="graphopt", options=...)`, `optimize` and `export`.

    Args:
        target: where the graph runs. "cpu" (default): graphopt's passes, then inductor's codegen;
            "llvm": TVM for x86; "aarch64": TVM cross-compiled (export only); "cuda": TVM for
            NVIDIA GPUs; "hls": FPGA C++, integer-only (needs quantize="int8"), run as its
            C simulation; "onnx": onnxruntime.
        quantize: None (float) or "int8" (post-training quantization).
        calibration: int8 calibration data: an iterable of example input tuples (positional
            arguments of the model), or a number N: calibrate on the first N real calls, which
            run in float, then switch to int8. None with quantize="int8" means N=8.
        observer: how activation ranges are measured: "minmax" (default) or "percentile"
            (the 0.01 and 99.99 percentiles: outliers clip instead of widening the scale).
        accuracy_budget: with quantize="int8", the largest relative output error
            (||int8 - float|| / ||float|| over the calibration data) to accept; the layers
            that cost the most stay in float until it is met (mixed precision). None: all int8.
        sparsity: fraction of weights to prune, 0 <= sparsity < 1.
        structured: prune whole channels (True) or single weights (False).
        devices: split the graph into one pipeline stage per device, in order, by the cost
            model (graphopt.passes.partition_stages); e.g. ["cpu", "cpu"]. CPU only for now.
            Across processes: graphopt.distributed.pipeline.
        fallback: "eager" runs ops no backend supports in PyTorch; "error" raises instead.
        verify: compare each pass and the compiled result with eager on the example inputs,
            and raise `VerificationError` naming the first stage that changed the numbers.
        disable_passes: names of pipeline passes to skip (see `graphopt.pipeline.PIPELINE`).
    """

    target: str = "cpu"
    quantize: str | None = None
    calibration: tuple | int | None = field(default=None, compare=False, repr=False)
    observer: str = "minmax"
    accuracy_budget: float | None = None
    sparsity: float = 0.0
    structured: bool = False
    devices: tuple[str, ...] | None = None
    fallback: str = "eager"
    verify: bool = False
    disable_passes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("target", self.target, TARGETS)
        _check_choice("quantize", self.quantize, QUANTIZE)
        _check_choice("fallback", self.fallback, FALLBACKS)
        _check_choice("observer", self.observer, OBSERVERS)
        if self.target == "hls" and self.quantize != "int8":
            raise ValueError(
                "graphopt option target='hls' computes in integers only (FPGA): set "
                f"quantize='int8' (and calibration), got quantize={self.quantize!r}"
            )
        if self.accuracy_budget is not None and (
            isinstance(self.accuracy_budget, bool)
            or not isinstance(self.accuracy_budget, int | float)
            or not self.accuracy_budget > 0
        ):
            raise ValueError(
                "graphopt option 'accuracy_budget' must be a positive number (relative output "
                f"error, e.g. 0.02) or None, got {self.accuracy_budget!r}"
            )
        for name in ("structured", "verify"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"graphopt option {name!r} must be True or False, got {getattr(self, name)!r}"
                )
        if (
            isinstance(self.sparsity, bool)
            or not isinstance(self.sparsity, int | float)
            or not (0.0 <= float(self.sparsity) < 1.0)
        ):
            raise ValueError(
                f"graphopt option 'sparsity' must be a number in [0, 1), got {self.sparsity!r}"
            )
        object.__setattr__(self, "sparsity", float(self.sparsity))
        if self.devices is not None:
            if isinstance(self.devices, str) or not isinstance(self.devices, Iterable):
                raise ValueError(
                    f"graphopt option 'devices' must be a list of device names like "
                    f"['cpu', 'cuda:0'], got {self.devices!r}"
                )
            object.__setattr__(self, "devices", tuple(str(d) for d in self.devices))
        if isinstance(self.calibration, bool) or (
            isinstance(self.calibration, int) and self.calibration < 1
        ):
            raise ValueError(
                "graphopt option 'calibration' must be an iterable of example input tuples or "
                f"a number of calls >= 1, got {self.calibration!r}"
            )
        if self.calibration is not None and not isinstance(self.calibration, int):
            if not isinstance(self.calibration, Iterable) or isinstance(
                self.calibration,
                torch.Tensor,  # iterating would split it along dim 0
            ):
                raise ValueError(
                    "graphopt option 'calibration' must be an iterable of example input tuples "
                    f"or a number of calls >= 1, got {type(self.calibration).__name__}"
                )
            batches = tuple(
                (b,) if isinstance(b, torch.Tensor) else tuple(b) for b in self.calibration
            )
            if not batches:
                raise ValueError("graphopt option 'calibration' is empty: give at least one batch")
            object.__setattr__(self, "calibration", batches)
        if isinstance(self.disable_passes, str):
            object.__setattr__(self, "disable_passes", (self.disable_passes,))
        object.__setattr__(self, "disable_passes", tuple(self.disable_passes))
        from graphopt.pipeline import pass_names  # late import: pipeline imports Config

        unknown = sorted(set(self.disable_passes) - set(pass_names()))
        if unknown:
            raise ValueError(
                f"graphopt option 'disable_passes' names unknown passes {unknown}; "
                f"accepted: {list(pass_names())}"
            )

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any] | Config | None = None, **kwargs: Any
    ) -> Config:
        """Build a Config from `options=` of torch.compile and/or keyword arguments.

        Raises `ValueError` naming an unknown key and listing the accepted ones.
        """
        if isinstance(options, Config):
            return dataclasses.replace(options, **kwargs) if kwargs else options
        merged = {**dict(options or {}), **kwargs}
        accepted = [f.name for f in dataclasses.fields(cls)]
        for key in merged:
            if key not in accepted:
                hint = _closest(key, accepted)
                raise ValueError(
                    f"unknown graphopt option {key!r}{hint}; accepted options: {accepted}"
                )
        return cls(**merged)

    def describe(self) -> dict[str, Any]:
        """The options as plain JSON-able values (calibration summarised by its length)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "calibration":
                if isinstance(value, tuple):
                    value = f"{len(value)} batches"
                elif isinstance(value, int):
                    value = f"first {value} calls"
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _check_choice(name: str, value: Any, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(
            f"graphopt option {name!r} got {value!r}; accepted values: {list(accepted)}"
        )


def _closest(key: str, accepted: list[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, accepted, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""
