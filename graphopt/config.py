"""The one configuration object: every option graphopt accepts is a field of `Config`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from graphopt import targets

TARGETS = tuple(targets.TARGETS)  # the table of targets: graphopt/targets.py
QUANTIZE = (None, "int8", "int8_weight_only", "int4_weight_only", "int8_dynamic")
GROUP_SIZES = (32, 64, 128)
DTYPES = ("float32", "bfloat16", "float16")
FALLBACKS = ("eager", "error")
OBSERVERS = ("minmax", "percentile")
PRUNE_SCOPES = ("layer", "global")
PRUNE_IMPORTANCE = ("l2", "l1")
DEFAULT_CALIBRATION_CALLS = 8
# The names `disable_passes` accepts: graphopt.pipeline registers its passes here when it is
# imported (importing graphopt imports it), so Config needs no import of the pipeline.
_PASS_NAMES: list[str] = []


def register_passes(names: Iterable[str]) -> None:
    """Declare the pipeline's pass names (`graphopt.pipeline` does, once)."""
    _PASS_NAMES[:] = list(names)


@dataclass(frozen=True)
class Config:
    """Options of `torch.compile(m, backend="graphopt", options=...)`, `optimize` and `export`.

    Args:
        target: where the graph runs. "cpu" (default): graphopt's passes, then inductor's codegen;
            "llvm": TVM for x86; "aarch64": TVM cross-compiled (export only); "cuda": TVM for
            NVIDIA GPUs; "hls": FPGA C++, integer-only (needs quantize="int8"), run as its
            C simulation; "onnx": onnxruntime.
        quantize: None (float); "int8" (post-training static quantization of conv and
            linear layers: int8 weights and activations, calibrated); "int8_weight_only" or
            "int4_weight_only" (linear layers' weights only, activations stay float: for
            memory-bound layers such as an LLM's decode step; no calibration data).
            "int8_dynamic": int8 weights, activations quantized per token at run time,
            integer matmuls (compute-bound layers: prefill, batched serving).
        dtype: the precision of matmuls and convolutions: "float32" (default), "bfloat16" or
            "float16" (or the torch dtype): their weights stored and multiplied in 16 bits;
            softmax, norms and reductions stay float32; outputs keep their dtypes. Applied
            where the CPU computes the dtype natively (bfloat16: AVX512_BF16 or AMX), else the
            graph stays float32 and the report says why. target="cpu" only, inference only.
        group_size: with quantize="int4_weight_only", input channels per scale and zero
            point: 32, 64 or 128 (default 128).
        smoothquant: with quantize="int8_dynamic", SmoothQuant's alpha in [0, 1] (e.g. 0.5):
            activation outliers are moved into the weights, measured on the calibration data
            (needs `calibration`). None (default): no smoothing.
        calibration: int8 calibration data: an iterable of example input tuples (positional
            arguments of the model), or a number N: calibrate on the first N real calls, which
            run in float, then switch to int8. None with quantize="int8" means N=8.
        observer: how activation ranges are measured: "minmax" (default) or "percentile"
            (the 0.01 and 99.99 percentiles: outliers clip instead of widening the scale).
        accuracy_budget: with quantize="int8", the largest relative output error
            (||int8 - float|| / ||float|| over the calibration data) to accept; the layers
            that cost the most stay in float until it is met (mixed precision). None: all int8.
        sparsity: fraction to prune, 0 <= sparsity < 1: of each prunable channel group with
            structured=True, of the conv/linear weights otherwise (graphopt.passes.prune).
        structured: remove whole channels, shrinking the tensors (True), or zero single
            weights (False), which saves storage only: no backend here runs sparse kernels.
        prune_pattern: None, or "N:M" (e.g. "2:4"): zero all but the N largest of every M
            weights along the input channels (structured=False; sparsity is then 1 - N/M).
        prune_scope: with structured=False, "layer" (default: each layer loses `sparsity` of
            its weights) or "global" (the smallest weights of all layers together).
        prune_importance: how channels are ranked with structured=True: "l2" (default) or
            "l1" norm of their weights, or a callable taking the group's weights (a list of
            [channels, -1] tensors, one per layer) and returning one score per channel.
        prune_round_to: with structured=True, keep a multiple of this many channels per
            group (e.g. 8 for AVX2/NEON vectors); default 1.
        prune_exclude: glob patterns of layer names (module paths, e.g. "layers.0.*") whose
            channels or weights are never pruned.
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
    dtype: str = "float32"
    group_size: int = 128
    smoothquant: float | None = None
    calibration: tuple | int | None = field(default=None, compare=False, repr=False)
    observer: str = "minmax"
    accuracy_budget: float | None = None
    sparsity: float = 0.0
    structured: bool = False
    prune_pattern: str | None = None
    prune_scope: str = "layer"
    prune_importance: Any = field(default="l2", compare=False)
    prune_round_to: int = 1
    prune_exclude: tuple[str, ...] = ()
    devices: tuple[str, ...] | None = None
    fallback: str = "eager"
    verify: bool = False
    disable_passes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("target", self.target, TARGETS)
        _check_choice("quantize", self.quantize, QUANTIZE)
        if isinstance(self.dtype, torch.dtype):  # torch.bfloat16 reads as "bfloat16"
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        _check_choice("dtype", self.dtype, DTYPES)
        line = targets.TARGETS[self.target]
        if self.dtype not in line.dtypes:
            takes = [t.name for t in targets.TARGETS.values() if self.dtype in t.dtypes]
            raise ValueError(
                f"graphopt option dtype={self.dtype!r} is implemented for target="
                f"{' or '.join(repr(t) for t in takes)} only; got target={self.target!r}: use "
                f"dtype={' or '.join(repr(d) for d in line.dtypes)} there"
            )
        if self.dtype != "float32" and self.quantize is not None:
            raise ValueError(
                f"graphopt options dtype={self.dtype!r} and quantize={self.quantize!r} do not "
                "combine yet: choose one (quantize for memory-bound layers, a 16-bit dtype for "
                "compute-bound ones)"
            )
        if self.smoothquant is not None and (
            isinstance(self.smoothquant, bool)
            or not isinstance(self.smoothquant, int | float)
            or not 0 <= self.smoothquant <= 1
            or self.quantize != "int8_dynamic"
        ):
            raise ValueError(
                "graphopt option 'smoothquant' is SmoothQuant's alpha, a number in [0, 1], "
                f"with quantize='int8_dynamic'; got smoothquant={self.smoothquant!r} with "
                f"quantize={self.quantize!r}"
            )
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"graphopt option 'group_size' got {self.group_size!r}; accepted values: "
                f"{list(GROUP_SIZES)}"
            )
        _check_choice("fallback", self.fallback, FALLBACKS)
        _check_choice("observer", self.observer, OBSERVERS)
        if line.quantize is not None and self.quantize not in line.quantize:
            raise ValueError(
                f"graphopt option target={self.target!r} ({line.summary}) takes quantize="
                f"{' or '.join(repr(q) for q in line.quantize)} (with calibration), got "
                f"quantize={self.quantize!r}"
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
        self._check_pruning()
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
        unknown = sorted(set(self.disable_passes) - set(_PASS_NAMES))
        if unknown:
            raise ValueError(
                f"graphopt option 'disable_passes' names unknown passes {unknown}; "
                f"accepted: {_PASS_NAMES}"
            )

    @property
    def needs_calibration(self) -> bool:
        """Whether `quantize` measures activations on calibration data (or the first calls)."""
        return self.quantize == "int8" or self.smoothquant is not None

    def _check_pruning(self) -> None:
        _check_choice("prune_scope", self.prune_scope, PRUNE_SCOPES)
        if not callable(self.prune_importance):
            _check_choice("prune_importance", self.prune_importance, PRUNE_IMPORTANCE)
        if (
            isinstance(self.prune_round_to, bool)
            or not isinstance(self.prune_round_to, int)
            or self.prune_round_to < 1
        ):
            raise ValueError(
                "graphopt option 'prune_round_to' must be an integer >= 1 (e.g. 8), got "
                f"{self.prune_round_to!r}"
            )
        if isinstance(self.prune_exclude, str):
            object.__setattr__(self, "prune_exclude", (self.prune_exclude,))
        object.__setattr__(self, "prune_exclude", tuple(self.prune_exclude))
        if self.structured and self.prune_scope != "layer":
            raise ValueError(
                "graphopt option prune_scope='global' applies to structured=False; structured "
                "pruning removes the same fraction of every channel group"
            )
        if self.prune_pattern is None:
            return
        n_m = self.prune_pattern.split(":") if isinstance(self.prune_pattern, str) else []
        if len(n_m) != 2 or not all(v.isdigit() for v in n_m) or not 0 < int(n_m[0]) < int(n_m[1]):
            raise ValueError(
                "graphopt option 'prune_pattern' must be 'N:M' with 0 < N < M (e.g. '2:4'), "
                f"got {self.prune_pattern!r}"
            )
        if self.structured:
            raise ValueError(
                "graphopt option prune_pattern zeroes single weights: use it with structured=False"
            )
        implied = 1 - int(n_m[0]) / int(n_m[1])
        if self.sparsity not in (0.0, implied):
            raise ValueError(
                f"graphopt option prune_pattern={self.prune_pattern!r} keeps {n_m[0]} of every "
                f"{n_m[1]} weights: sparsity is {implied:g}, got sparsity={self.sparsity!r}"
            )
        object.__setattr__(self, "sparsity", implied)

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
            elif callable(value):
                value = getattr(value, "__name__", repr(value))
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
