"""The torch.compile backend: `torch.compile(model, backend="graphopt", options={...})`.

Registered through the `torch_dynamo_backends` entry point, so no `import graphopt` is needed.
dynamo's graph is traced to core ATen by aot_autograd (which also handles input mutation,
aliasing, dynamic shapes and the forward/backward split); graphopt's compilers then
  * inference (grad disabled, or nothing requires grad): freeze parameters and buffers into
    constants, run the full pipeline, lower for the target;
  * training: run the training-safe passes on the forward and backward graphs and lower both.
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
import time
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from graphopt import targets
from graphopt.capture import freeze_placeholders, is_param_source
from graphopt.compiler import compile_graph, new_report
from graphopt.config import Config
from graphopt.passes.base import copy_graph_module
from graphopt.shapes import concrete

log = logging.getLogger("graphopt")


def graphopt_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | Config | None = None,
    **kwargs: Any,
) -> Callable[..., Any]:
    """dynamo backend entry point. `options` are `Config` fields; unknown keys raise ValueError."""
    if kwargs.get("mode") not in (None, "default"):
        raise ValueError(
            f"graphopt does not take torch.compile(mode={kwargs['mode']!r}); use options= "
            f"with the fields of graphopt.Config"
        )
    cfg = Config.from_options(options)
    return compile_dynamo_graph(gm, list(example_inputs), cfg)


def compile_dynamo_graph(
    dynamo_gm: torch.fx.GraphModule, example_inputs: list[Any], cfg: Config
) -> Callable[..., Any]:
    from torch._dynamo.backends.common import aot_autograd

    start = time.perf_counter()
    placeholders = dynamo_gm.graph.find_nodes(op="placeholder")
    param_indices = [i for i, node in enumerate(placeholders) if is_param_source(node)]
    calibration = None
    if cfg.needs_calibration and isinstance(cfg.calibration, tuple):
        calibration = bind_calibration(placeholders, cfg.calibration)
    real_inputs = [concrete(x) for x in example_inputs]
    training = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    )
    if training:
        if cfg.quantize is not None:
            log.warning(
                "graphopt: quantize=%r applies to inference graphs (call under torch.no_grad() "
                "or with parameters that do not require grad); this training graph stays float",
                cfg.quantize,
            )
        if cfg.dtype != "float32":
            log.warning(
                "graphopt: dtype=%r applies to inference graphs; this training graph stays "
                "float32 (for mixed-precision training, run the step under torch.autocast)",
                cfg.dtype,
            )
        fw = functools.partial(_training_compiler, cfg=cfg, mode="training-forward", start=start)
        bw = functools.partial(_training_compiler, cfg=cfg, mode="training-backward", start=None)
        options, context = targets.backend(cfg.target).training_capture(example_inputs)
        with context:
            return aot_autograd(fw_compiler=fw, bw_compiler=bw, **options)(
                dynamo_gm, example_inputs
            )
    inference = functools.partial(
        _inference_compiler,
        cfg=cfg,
        param_indices=param_indices,
        real_inputs=real_inputs,
        calibration=calibration,
        start=start,
    )
    return aot_autograd(
        fw_compiler=inference,
        inference_compiler=inference,
        decompositions=targets.backend(cfg.target).decompositions(training=False),
        keep_inference_input_mutations=True,
    )(dynamo_gm, example_inputs)


def _inference_compiler(
    gm: torch.fx.GraphModule,
    fake_inputs: list[Any],
    *,
    cfg: Config,
    param_indices: list[int],
    real_inputs: list[Any],
    calibration: list[list[Any]] | None,
    start: float,
) -> Callable[..., Any]:
    from torch._functorch.aot_autograd import MutationType
    from torch._guards import TracingContext

    capture_seconds = time.perf_counter() - start  # aot_autograd's trace to ATen
    context = TracingContext.try_get()
    placeholders = gm.graph.find_nodes(op="placeholder")
    frozen: list[int] = []
    # aot_autograd's inputs are dynamo's, in order, after the parameters aot_autograd lifted
    # itself: none with inlined nn.Modules, unless inductor's freezing is on (then dynamo keeps
    # parameters as attributes of its graph and aot_autograd passes them first, `params_flat`).
    # Anything else, we do not freeze rather than guess.
    lifted = list(context.params_flat or []) if context is not None else []
    if lifted and len(placeholders) == len(lifted) + len(real_inputs):
        real_inputs = [*lifted, *real_inputs]
        param_indices = [*range(len(lifted)), *(i + len(lifted) for i in param_indices)]
        if calibration is not None:
            calibration = [[*lifted, *batch] for batch in calibration]
    if (
        context is not None
        and context.fw_metadata is not None
        and (len(placeholders) == len(real_inputs))
    ):
        meta = context.fw_metadata
        unsafe = {
            i
            for i, info in enumerate(meta.input_info)
            if info.mutation_type != MutationType.NOT_MUTATED
        }
        unsafe |= {o.base_idx for o in meta.output_info if o.base_idx is not None}
        frozen = [i for i in param_indices if i not in unsafe]
    have_values = len(real_inputs) == len(placeholders)
    # dynamo does not guard the identity of parameters (they are graph inputs), so this graph
    # is reused for any module of the same code: another instance with other weights, or this
    # one after an in-place update. Each call checks that it passes the weights frozen here;
    # other weights get a graph of their own, compiled from an untouched copy of this one.
    pristine = copy_graph_module(gm) if frozen else None

    def build(values: list[Any], graph: torch.fx.GraphModule) -> Callable[..., Any]:
        report = new_report(cfg)
        report.capture_seconds = capture_seconds
        freeze_placeholders(graph, {i: values[i] for i in frozen}, share=True)  # leaves `kept`
        return compile_graph(
            graph,
            [fake_inputs[i] for i in kept],
            cfg,
            report,
            real_inputs=[values[i] for i in kept] if have_values else None,
            calibration=[
                [values[i] if i in param_indices else batch[i] for i in kept]
                for batch in calibration
            ]
            if calibration is not None and have_values
            else None,
        )

    kept = [i for i in range(len(placeholders)) if i not in frozen]
    variants = _WeightVariants(
        frozen,
        real_inputs,
        build(real_inputs, gm),
        compile_for=lambda values: build(values, copy_graph_module(pristine)),
    )

    def run(args: list[Any]) -> Any:
        return variants.for_call(args)(*[args[i] for i in kept])

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


class _WeightVariants:
    """The compiled graphs of one dynamo graph, one per set of frozen weights.

    A call matches a variant when it passes the very tensors that variant froze (by identity,
    held weakly) at the versions they had (an in-place update bumps a tensor's version). The
    `LIMIT` most recently used variants are kept, as dynamo keeps `recompile_limit` graphs per
    frame; `compile_for(args)` builds the graph for weights no variant has.
    """

    LIMIT = 8

    def __init__(
        self,
        indices: list[int],
        values: list[Any],
        compiled: Callable[..., Any],
        compile_for: Callable[[list[Any]], Callable[..., Any]],
    ):
        self.indices, self.compile_for = indices, compile_for
        # C-level picking: this check runs on every call, over every frozen weight (a few
        # hundred tensors for a CNN), so it avoids a Python-level loop per tensor
        self._pick = operator.itemgetter(*indices) if len(indices) > 1 else None
        self.variants: list[tuple[_Stamp, Callable[..., Any]]] = []  # most recently used first
        self._add(values, compiled)

    def _tensors(self, args: list[Any]) -> list[Any]:
        if self._pick is not None:
            return list(self._pick(args))
        return [args[i] for i in self.indices]

    def _add(self, values: list[Any], compiled: Callable[..., Any]) -> None:
        tensors = self._tensors(values)
        variant = (([weakref.ref(t) for t in tensors], _versions(tensors)), compiled)
        self.variants = [variant, *self.variants[: self.LIMIT - 1]]

    def for_call(self, args: list[Any]) -> Callable[..., Any]:
        """The compiled graph for the weights in `args`, compiled now if no variant has them."""
        tensors = self._tensors(args)
        now = _versions(tensors)
        for k, ((refs, versions), compiled) in enumerate(self.variants):
            if _same(refs, tensors) and versions == now:
                if k:
                    self.variants.insert(0, self.variants.pop(k))
                return compiled
        (refs, versions), _ = self.variants[0]
        changed = sum(
            ref() is not t or n != then for ref, t, n, then in zip(refs, tensors, now, versions)
        )
        log.warning(
            "graphopt: this call passes other weights than the graph froze (%d of %d "
            "tensors: another module instance, or weights changed in place): compiling the "
            "graph for these weights",
            changed,
            len(tensors),
        )
        # A variant of these very tensors at older versions is stale: it can never match again.
        self.variants = [v for v in self.variants if not _same(v[0][0], tensors)]
        self._add(args, self.compile_for(args))
        return self.variants[0][1]


_Stamp = tuple[list[weakref.ref], list[int]]  # (the frozen tensors, their versions)


_VERSION = operator.attrgetter("_version")


def _same(refs: list[weakref.ref], tensors: list[Any]) -> bool:
    """Each weak reference points to the tensor in the same place of `tensors`."""
    return all(map(operator.is_, map(weakref.ref.__call__, refs), tensors))


def _versions(tensors: list[Any]) -> list[int]:
    """In-place version counters (-1 for a tensor without one, e.g. an inference tensor)."""
    try:
        return list(map(_VERSION, tensors))
    except (AttributeError, RuntimeError):
        return [getattr(t, "_version", -1) if not _is_inference(t) else -1 for t in tensors]


def _is_inference(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_inference()


def _training_compiler(
    gm: torch.fx.GraphModule,
    fake_inputs: list[Any],
    *,
    cfg: Config,
    mode: str,
    start: float | None,
) -> Callable[..., Any]:
    report = new_report(cfg, mode=mode)
    if start is not None:
        report.capture_seconds = time.perf_counter() - start
    compiled = compile_graph(gm, fake_inputs, cfg, report, training=True)

    def run(args: list[Any]) -> Any:
        return compiled(*args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def bind_calibration(
    placeholders: list[torch.fx.Node], batches: tuple[tuple[Any, ...], ...]
) -> list[list[Any]] | None:
    """Values for every placeholder of a dynamo graph, per calibration batch, or None.

    Each batch holds the positional arguments of the compiled function (or module, without
    `self`). dynamo names where each placeholder comes from (`L['x']`, `L['x'].size()[0]`,
    `L['self']._modules['fc']._parameters['weight']`); those names are evaluated against the
    batch bound to the traced frame's argument names, and against the traced frame's `self`
    for module attributes. None when that is impossible (e.g. the graph after a graph break
    starts inside the function, where the inputs are intermediate values): the caller then
    calibrates on the first real calls instead, and says so.
    """
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    if context is None or not context.traced_code:
        return None
    code = context.traced_code[0]
    cells = tuple(types.CellType() for _ in code.co_freevars)
    signature = inspect.signature(types.FunctionType(code, {}, closure=cells))
    sources = []
    for node in placeholders:
        grapharg = node.meta.get("grapharg")
        if grapharg is None or grapharg.source is None:
            return None
        sources.append(grapharg.source.name)
    user = [i for i, node in enumerate(placeholders) if not is_param_source(node)]
    out: list[list[Any]] = []
    for batch in batches:
        bound = _bind(signature, batch)
        if bound is None:
            log.warning(
                "graphopt: a calibration batch of %d values does not fit %s%s; calibrating on "
                "the first real calls instead",
                len(batch),
                code.co_name,
                signature,
            )
            return None
        values: list[Any] = [None] * len(placeholders)
        for i in user:
            try:
                values[i] = eval(sources[i], {"__builtins__": {}}, {"L": bound})  # noqa: S307
            except Exception:  # noqa: BLE001 - an input the batch cannot provide
                return None
        out.append(values)
    return out


def _bind(signature: inspect.Signature, batch: tuple[Any, ...]) -> dict[str, Any] | None:
    """The traced frame's locals for positional `batch` (with a `self` slot if one is missing)."""
    for args in (batch, (None, *batch)):
        try:
            bound = signature.bind(*args)
        except TypeError:
            continue
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                bound.arguments.setdefault(name, ())
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                bound.arguments.setdefault(name, {})
        return dict(bound.arguments)
    return None
