"""`graphopt.optimize`: the export-path front door (torch.export -> passes -> lowering);
`graphopt.prune`; `graphopt.tune` (TVM schedules measured on this machine)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from graphopt.capture import CapturedGraph
from graphopt.compiler import compile_graph, new_report
from graphopt.config import Config
from graphopt.errors import VerificationError
from graphopt.frontend import calibration_batches, capture, optimized_graph
from graphopt.passes.base import make_trainable
from graphopt.pipeline import lossy
from graphopt.report import Report
from graphopt.testing import compare_outputs


class OptimizedModule(torch.nn.Module):
    """The optimized model: call it like the original. `.report` says what graphopt did.

    `.graph_module` is the graph after graphopt's passes, to read. With target="cpu" its
    weights are released once inductor has frozen them into the compiled code, so it no
    longer runs (the compiled code holds the one copy it needs).
    """

    def __init__(self, compiled: Any, captured: CapturedGraph, report: Report, cfg: Config):
        super().__init__()
        self._compiled = compiled
        self._in_spec, self._out_spec = captured.in_spec, captured.out_spec
        self.graph_module = captured.gm
        self.report = report
        self.config = cfg

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = pytree.tree_flatten((args, kwargs))
        if self._in_spec is not None and spec != self._in_spec:
            raise TypeError(f"optimized model was captured for inputs {self._in_spec}, got {spec}")
        out = self._compiled(*flat)
        if self._out_spec is None:
            return out
        return pytree.tree_unflatten(list(out), self._out_spec)


def optimize(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    dynamic_shapes: Any = None,
    **options: Any,
) -> OptimizedModule:
    """Optimize `model` for its example inputs and return a module that runs the result.

    Args:
        model: an nn.Module in eval mode (weights and buffers are frozen into the graph).
        example_inputs: a tuple of example positional inputs.
        dynamic_shapes: as in torch.export.export, e.g. {"x": {0: torch.export.Dim("batch")}}.
        **options: fields of `graphopt.Config` (target, quantize, calibration, verify, ...).
            `calibration` batches are tuples of positional inputs like `example_inputs`.

    Returns:
        An `OptimizedModule` with `.report` (per pass, per partition, params and FLOPs).
    """
    cfg = Config.from_options(options)
    report = new_report(cfg)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    captured = capture(model, example_inputs, report, dynamic_shapes=dynamic_shapes, cfg=cfg)
    # Lower for the traced (fake, possibly symbolic) inputs so dynamic dims stay dynamic.
    traced_inputs = [n.meta["val"] for n in captured.gm.graph.find_nodes(op="placeholder")]
    calibration = calibration_batches(captured, cfg)
    compiled = compile_graph(
        captured.gm,
        traced_inputs,
        cfg,
        report,
        real_inputs=captured.example_inputs,
        calibration=calibration,
    )
    optimized = OptimizedModule(compiled, captured, report, cfg)
    if cfg.verify and not lossy(cfg):  # int8 and pruning were checked against their graph
        with torch.no_grad():
            problem = compare_outputs(model(*example_inputs), optimized(*example_inputs))
        if problem is not None:
            raise VerificationError("whole model (export capture)", problem)
    return optimized


def tune(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    budget_s: float = 1200.0,
    max_trials: int | None = None,
    progress: bool = True,
    dynamic_shapes: Any = None,
    **options: Any,
) -> Any:
    """Tune TVM's x86 kernels for `model` on this machine and keep them for later compiles.

    graphopt optimizes the model for `target="llvm"` as `optimize` does, collects the fused
    kernels TVM builds, and searches schedules for them with MetaSchedule for `budget_s`
    seconds, timing candidates here. The results go to this target's tuning database
    (`$GRAPHOPT_TUNE_DIR`, default ~/.cache/graphopt/tune), which every later llvm compile
    (optimize, torch.compile, export with format="tvm") applies. Tuning again continues
    from what was measured.

    Args:
        budget_s: wall-clock seconds of tuning (the round running at the deadline finishes).
        max_trials: stop once this many candidates were timed (the batch under way finishes;
            None: the budget decides).
        progress: a progress bar on stderr.
        **options: `graphopt.Config` fields, as for `optimize`; target must be "llvm".

    Returns:
        A `TuneResult` (printable): trials, per kernel its call count, trials and best time.
    """
    options.setdefault("target", "llvm")
    cfg = Config.from_options(options)
    if cfg.target != "llvm":
        raise ValueError(
            f"graphopt.tune tunes target='llvm' (this x86 host), not target={cfg.target!r}"
        )
    from graphopt.backends.tvm import build
    from graphopt.backends.tvm import tune as tvm_tune

    with build.collect_kernels() as mods:
        optimize(model, example_inputs, dynamic_shapes=dynamic_shapes, **options)
    if not mods:
        raise ValueError(
            "nothing to tune: no part of the model was lowered to TVM (see the report of "
            "graphopt.optimize(..., target='llvm') for the ops that ran in PyTorch)"
        )
    return tvm_tune.tune_kernels(
        mods,
        build.target_for(cfg),
        budget_s=budget_s,
        max_trials=max_trials,
        progress=progress,
    )


def prune(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    dynamic_shapes: Any = "batch",
    **options: Any,
) -> OptimizedModule:
    """Prune `model` and return it as a PyTorch module with smaller, trainable weights.

    The same passes as `optimize` (BatchNorm folded into the convs, then the prune pass), but
    nothing is lowered: the result runs in PyTorch, its weights are `nn.Parameter`s (each layer
    its own copy), so `graphopt.recover` can fine-tune it; compile, optimize or export it after.

    Args:
        model: an nn.Module in eval mode.
        example_inputs: a tuple of example positional inputs.
        dynamic_shapes: "batch" (default): dim 0 of every tensor input may vary, so training
            batches can be larger than the example (torch.export specializes a batch of 1:
            give an example batch of 2 or more); None: the example's shapes only; or a
            torch.export dynamic_shapes spec.
        **options: sparsity (required, > 0, or prune_pattern), structured, prune_pattern,
            prune_scope, prune_importance, prune_round_to, prune_exclude (see `Config`).

    Returns:
        An `OptimizedModule` running the pruned graph in PyTorch, with `.report`.
    """
    cfg = Config.from_options(options)
    if cfg.sparsity == 0:
        raise ValueError(
            "graphopt.prune needs sparsity > 0 (e.g. sparsity=0.5, structured=True) or "
            "prune_pattern='2:4'"
        )
    if cfg.quantize is not None or cfg.devices is not None:
        raise ValueError(
            "graphopt.prune returns a float PyTorch model to fine-tune; quantize or partition it "
            "afterwards, e.g. graphopt.optimize(pruned, example_inputs, quantize='int8', ...)"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if dynamic_shapes == "batch":
        dynamic_shapes = _batch_dim_auto(example_inputs)
    report = new_report(cfg)
    captured, gm = optimized_graph(
        model, example_inputs, cfg, dynamic_shapes=dynamic_shapes, report=report
    )
    make_trainable(gm)
    pruned = CapturedGraph(gm, captured.example_inputs, captured.in_spec, captured.out_spec)
    return OptimizedModule(gm, pruned, report, cfg)


def _batch_dim_auto(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """A dynamic_shapes spec marking dim 0 of each tensor input Dim.AUTO (dynamic if it can)."""
    auto = torch.export.Dim.AUTO
    return tuple(
        {0: auto} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs
    )


def int8_program(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    calibration: Sequence[Sequence[torch.Tensor]],
    *,
    dynamic_shapes: Any = None,
) -> Any:
    """The integer program `graphopt.export(model, ..., format="hls", quantize="int8",
    calibration=calibration)` writes, without writing or compiling anything:
    `graphopt.backends.hls.run_program(program, [x])` is graphopt's int8 reference, which the
    C simulation equals."""
    from graphopt.backends.hls import build_program

    cfg = Config(target="hls", quantize="int8", calibration=tuple(calibration))
    _, gm = optimized_graph(model, example_inputs, cfg, dynamic_shapes=dynamic_shapes)
    return build_program(gm)
