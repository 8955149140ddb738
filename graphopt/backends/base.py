"""The interface every target implements: compile a graph for torch.compile / optimize, and
write, check and load the artifacts of `graphopt.export`.

A target is a `Backend` subclass in its folder under graphopt/backends/ plus one line in
`graphopt.targets.TARGETS` (which names the class). graphopt's lowering, export, load,
partitioning and the CLI reach targets only through this interface.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx

from graphopt.backends.registry import OpRegistry
from graphopt.config import Config
from graphopt.targets import Target


@dataclass
class Compiled:
    """A graph (or one partition of it) compiled by a backend.

    Attributes:
        fn: call it with the graph's placeholders; returns the graph's outputs (a tuple, or
            the value for a one-output graph compiled whole).
        note: one line for the report's partition table (e.g. which GEMM each linear uses).
        cache_hit: the code came from the backend's disk cache (nothing was compiled).
        schedules: how its kernels were scheduled ("3/19 kernels tuned"), if that varies.
        warnings: what the user should know about the compiled code (the report keeps them).
    """

    fn: Callable[..., Any]
    note: str = ""
    cache_hit: bool = False
    schedules: str | None = None
    warnings: list[str] = field(default_factory=list)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


@dataclass
class ExportJob:
    """What a backend writes an artifact from (`graphopt.export`).

    Attributes:
        gm: the optimized graph (after every pass).
        cfg: the options.
        example_inputs: real values for gm's placeholders (the model's flattened inputs).
        calibration: the calibration batches, flattened like example_inputs ([] if none).
        dim_names: torch's symbol -> the user's Dim name, for dynamic dims.
        options: what `Backend.export_options` made of the format's options.
        say: progress output (one line per step).
    """

    gm: torch.fx.GraphModule
    cfg: Config
    example_inputs: list[Any]
    calibration: list[list[Any]]
    dim_names: dict[str, str]
    options: Any
    say: Callable[[str], None]


# Decompositions that are wrong beneath autograd. aot_autograd records each op's own derivative
# formula and applies the table below it, so a decomposition must return exactly the op's
# outputs: the formula saves them for the backward. torch 2.13's decomposition of the fused CPU
# attention returns the attention probabilities ([N, H, L, S]) where the op returns its
# logsumexp ([N, H, L]); `_scaled_dot_product_flash_attention_for_cpu_backward` then reads the
# probabilities as the softmax normalizer and every attention gradient is wrong, silently. In
# inference nothing reads that output and the decomposition is right. inductor's own table
# leaves the op out as well. tests/e2e/test_training.py proves the training tables on real
# models, `python -m tests.opinfo.sweep --grad` on every differentiable OpInfo.
_WRONG_UNDER_AUTOGRAD = (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,)


class Backend:
    """One target. Subclasses set `label` and `registry` and implement `compile`; targets with
    an artifact format also implement the export half (`model_file`, `write`, `load`, ...).

    Attributes:
        target: its line of the target table (name, format, int8 policy, ...).
        label: what the report calls the code it compiles ("inductor", "tvm-llvm").
        registry: the ops it lowers (its capability list); `supports_all` means it takes whole
            graphs and nothing is partitioned.
        model_file: the artifact's model file, relative to the folder.
        versions: modules whose versions the artifact's manifest records.
    """

    label: str = ""
    registry: OpRegistry
    model_file: str = ""
    versions: tuple[str, ...] = ()

    def __init__(self, target: Target):
        self.target = target

    @property
    def name(self) -> str:
        return self.target.name

    # ------------------------------------------------------------ torch.compile / optimize

    def check_runs_here(self, cfg: Config) -> None:
        """Raise RuntimeError saying why this machine cannot run the target's code (a missing
        GPU), NotImplementedError for an export-only target. Called once before anything is
        compiled: one clear error, not a fallback per piece."""
        if not self.target.runs_here:
            how = (
                f"graphopt.export(model, inputs, out_dir, format={self.target.format!r}, "
                f"target={self.name!r})"
                if self.target.format
                else "another target"
            )
            raise NotImplementedError(
                f"target={self.name!r} ({self.target.summary}) cannot run on this host through "
                f"torch.compile or graphopt.optimize; use {how}"
            )

    def compile(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        cfg: Config,
        *,
        training: bool = False,
        backward: bool = False,
    ) -> Compiled:
        """Compile `gm` (a whole graph if `registry.supports_all`, else one partition of
        supported nodes). `example_inputs` are fake tensors under torch.compile, real ones on
        the export path. `training`: a forward (or with `backward`, backward) graph of
        aot_autograd, weights as inputs. A raised exception makes the piece run in PyTorch
        (named in the report), or with fallback="error" raises."""
        raise NotImplementedError(f"target={self.name!r} has no compile")

    def decompositions(self, training: bool) -> dict[Any, Any]:
        """The ATen decompositions torch.compile's capture traces with for this target: torch's
        core-ATen table, which every lowering reads (TVM, HLS and ONNX need core ATen); for
        training, less the decompositions whose outputs differ from the op's own
        (`_WRONG_UNDER_AUTOGRAD`), which a derivative formula recorded above them would
        misread: such an op stays whole, with torch's forward and backward kernels (a lowering
        without a rule for it runs it in PyTorch)."""
        from torch._decomp import core_aten_decompositions

        table = dict(core_aten_decompositions())
        if training:
            for op in _WRONG_UNDER_AUTOGRAD:
                table.pop(op, None)
        return table

    def training_capture(
        self, example_inputs: Sequence[Any]
    ) -> tuple[dict[str, Any], contextlib.AbstractContextManager]:
        """(aot_autograd's options, the context to trace in) for a training graph: these
        decompositions and aot_autograd's default forward/backward split."""
        return {"decompositions": self.decompositions(training=True)}, contextlib.nullcontext()

    # ------------------------------------------------------------ graphopt.export / load

    def export_options(self, cfg: Config, options: Any) -> Any:
        """Check the format's own options of `graphopt.export` (e.g. tvm_target) before any
        work and return what `write` gets as `job.options`."""
        if options is not None:
            raise ValueError(f"format={self.target.format!r} takes no format options")
        return None

    def check_export(self, gm: torch.fx.GraphModule, cfg: Config) -> None:
        """Raise `UnsupportedOpError` listing every node the artifact cannot express, before
        anything is written (an artifact cannot run pieces in PyTorch)."""

    def write(self, job: ExportJob, folder: Path) -> dict[str, Any]:
        """Write the artifact's files into `folder`; returns the sections it adds to the
        manifest (e.g. {"tvm": {...}})."""
        raise NotImplementedError(f"target={self.name!r} writes no artifacts")

    def where_artifact_runs(self, cfg: Config) -> str | dict[str, Any]:
        """How this machine runs the artifact ("in onnxruntime (CPU)"), or why it cannot and
        what was checked instead: {"ran": False, "reason": ...}."""
        return "in process"

    def load(self, folder: Path, manifest: dict[str, Any]) -> Callable[..., Any]:
        """A function running the artifact in `folder` on flat input tensors, returning a
        sequence of tensors (the files' sha256 are already checked)."""
        raise NotImplementedError(f"target={self.name!r} loads no artifacts")
