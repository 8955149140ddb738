"""The default x86 lowering: inductor's codegen on the graph graphopt's passes produced.

Inductor lowers or falls back for every ATen op, so its registry supports everything and the
graph is never split. Frozen weights are buffers of the graph module, so inductor's freezing
(`torch._inductor.config.freezing`) folds them and prepacks them for oneDNN.

Inference graphs get inductor's C++ wrapper (`cpp_wrapper`): the code that allocates buffers
and calls each kernel is compiled C++ instead of Python, which takes the per-kernel Python
overhead off every call (it counts in a model of many small kernels, such as MobileNetV2's
52 convolutions) for a longer first compile (a few seconds: g++ builds the wrapper).

Inductor packs every fp32 linear for MKL's GEMM on x86; `_LinearGemm` moves each to oneDNN's
packed GEMM where that is faster on the host for its shape (timed when compiling).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from graphopt import quantized_linear
from graphopt.backends.base import Backend, Compiled
from graphopt.backends.registry import OpRegistry
from graphopt.config import Config
from graphopt.passes.base import (
    get_attr_value,
    insert_constant,
    mutates,
    storage_of,
    written_arguments,
)

INDUCTOR = OpRegistry("inductor", supports_all=True)
log = logging.getLogger("graphopt")


class InductorBackend(Backend):
    """target "cpu": whole graphs, inference and training, through inductor."""

    label = "inductor"
    registry = INDUCTOR

    def decompositions(self, training: bool) -> dict[Any, Any]:
        """Training: inductor's table, as inductor's own training path uses: the forward and
        backward graphs go to inductor's graph compiler as they are, so that the forward can
        tell aot_autograd the strides of the activations it saves. Inference: core ATen (the
        passes read it; `compile_fx` re-traces with inductor's table)."""
        if not training:
            return super().decompositions(training)
        import torch._inductor.lowering  # noqa: F401 - some of the table's entries call into it
        from torch._inductor.decomposition import select_decomp_table

        return dict(select_decomp_table())

    def training_capture(
        self, example_inputs: Sequence[Any]
    ) -> tuple[dict[str, Any], contextlib.AbstractContextManager]:
        """The joint graph traced and split as inductor's own torch.compile backend does it:
        its decomposition table, its joint-graph passes (random ops to inductor's RNG, pattern
        rewrites) and min-cut partitioner (cheap ops recomputed in the backward rather than
        saved; inductor reuses saved activations' memory on the assumption that this
        partitioner chose them), side-effect tokens taken out of the graphs."""
        from torch._functorch import config as functorch_config
        from torch._guards import detect_fake_mode
        from torch._inductor.compile_fx import partition_fn
        from torch._inductor.virtualized import V

        options = {
            "decompositions": self.decompositions(training=True),
            "partition_fn": partition_fn,
            "keep_inference_input_mutations": True,
        }
        context = contextlib.ExitStack()
        fake_mode = detect_fake_mode(list(example_inputs))
        if fake_mode is not None:  # the joint-graph passes make their tensors in it
            context.enter_context(V.set_fake_mode(fake_mode))
        context.enter_context(functorch_config.patch(unlift_effect_tokens=True))
        return options, context

    def compile(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        cfg: Config,
        *,
        training: bool = False,
        backward: bool = False,
    ) -> Compiled:
        from graphopt.passes.quantize import onednn_saturation_warning

        warning = onednn_saturation_warning(gm)
        compiled = compile_inductor(gm, example_inputs, cfg, training=training, backward=backward)
        compiled.warnings += [warning] if warning else []
        return compiled


def compile_inductor(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    cfg: Config,
    *,
    training: bool = False,
    backward: bool = False,
) -> Compiled:
    """Compile `gm` with inductor: a function of the same inputs, and which GEMM each fp32
    linear uses (the note).

    Args:
        example_inputs: fake tensors (inside torch.compile) or real ones (export path).
        training: a forward (or with `backward`, backward) graph of aot_autograd (weights
            are inputs: no freezing).
    """
    from torch._guards import TracingContext, detect_fake_mode, tracing
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    if training:
        return Compiled(_compile_training_graph(gm, example_inputs, backward=backward))
    tile_int8_weights(gm)  # the layout graphopt's int8 GEMV streams fastest
    fake_mode = detect_fake_mode(list(example_inputs))
    stack = contextlib.ExitStack()
    with stack:
        if fake_mode is not None:
            # A fresh tracing context keeps inductor's own aot_autograd from overwriting the
            # metadata of the one torch.compile is running.
            stack.enter_context(tracing(TracingContext(fake_mode)))
            stack.enter_context(mock.patch.object(fake_mode, "allow_non_fake_inputs", True))
        settings = _settings(gm, example_inputs, training)
        stack.enter_context(inductor_config.patch(settings))
        stack.enter_context(torch.no_grad())
        fn = compile_fx(gm, list(example_inputs))
    _release_frozen_weights(fn, gm)
    gemm = settings.get("post_grad_custom_pre_pass")
    used = isinstance(gemm, _LinearGemm) and (gemm.moved or gemm.kept)
    return Compiled(fn, note=gemm.note() if used else "")


def tile_int8_weights(gm: torch.fx.GraphModule) -> int:
    """Rewrite the constant int8 weights of gm's `linear_int8_weight` calls into the tiled
    layout of the CPU kernels (`quantized_linear.tile_int8`), freeing the [N, K] copy where
    nothing else reads it. What the x86 lowering does before inductor compiles the graph, as
    inductor prepacks float weights for oneDNN: the graph the passes produced, the report and
    every export keep the [N, K] layout. Returns how many weights were tiled."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    op = torch.ops.graphopt.linear_int8_weight.default
    tiled: dict[torch.fx.Node, torch.fx.Node] = {}  # a weight two calls read is tiled once
    for node in list(gm.graph.find_nodes(op="call_function", target=op)):
        weight = node.args[1]
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            continue
        if weight not in tiled:
            value = get_attr_value(gm, weight)
            with unset_fake_temporarily():  # the constants are real tensors, inside a compile
                tiles = quantized_linear.int8_kernel_layout(value)
                if tiles is value:
                    continue
                tiled[weight] = insert_constant(gm, tiles, f"{weight.target}_tiles", node)
        node.replace_input_with(weight, tiled[weight])
        if not weight.users:
            gm.graph.erase_node(weight)
            if "." not in weight.target and not any(
                n.op == "get_attr" and n.target == weight.target for n in gm.graph.nodes
            ):
                delattr(gm, weight.target)
    if tiled:
        gm.graph.lint()
        gm.recompile()
    return len(tiled)


def _compile_training_graph(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, backward: bool
) -> Callable[..., Any]:
    """A forward or backward graph of aot_autograd, compiled as inductor compiles its own.

    It runs in aot_autograd's tracing context (not a fresh one, as `compile_fx` needs): the
    forward reports there the strides of the activations it saves, and aot_autograd compiles
    the backward for those strides. Inductor may return a saved activation with other
    strides than the traced graph says (a `cat` with an empty operand comes back as a view
    of the other), and the backward's inductor code asserts the strides it was built for.
    """
    from torch._guards import TracingContext
    from torch._inductor import compile_fx as inductor
    from torch._inductor import config as inductor_config

    _keep_mislowered_ops_whole(gm)
    extra = inductor.create_compiler_config_extra(gm)
    inputs = list(example_inputs)
    with inductor_config.patch(_settings(gm, inputs, True)):
        if backward:
            compiled = inductor.compile_fx_backward(gm, inputs, compiler_config_extra=extra)
        else:
            context = TracingContext.try_get()
            meta = context.fw_metadata if context is not None else None
            if meta is not None and meta.bw_donated_idxs:
                meta.bw_donated_idxs = _donatable(gm, meta)
            # The model's own outputs (their strides are kept); saved activations follow them.
            outputs = (
                len(meta.output_info) if meta is not None else len(gm.graph.output_node().args[0])
            )
            compiled = inductor.compile_fx_forward(
                gm,
                inputs,
                num_orig_model_outputs=outputs,
                num_example_inputs=len(inputs),
                compiler_config_extra=extra,
            )

    def run(*args: Any) -> Any:
        return compiled(list(args))

    return run


# Ops inductor (torch 2.13) lowers to wrong numbers, with a test of the arguments that trigger
# it. graphopt hands such a node to inductor as an opaque call of torch's own kernel, which
# inductor runs as it is. Found by the gradient sweep (`python -m tests.opinfo.sweep --mode
# grad`); tests/backends/inductor_target/test_training_graphs.py holds each case.
#   avg_pool{2,3}d_backward with ceil_mode=True: the window that starts inside the input and
#   overhangs it spreads its gradient with another divisor than the forward divided by (off
#   by up to 1.4 for AvgPool2d(2, 2, ceil_mode=True) on a 7x7 input).
MISLOWERED: dict[Any, Callable[[torch.fx.Node], bool]] = {
    torch.ops.aten.avg_pool2d_backward.default: lambda node: bool(node.args[5]),
    torch.ops.aten.avg_pool3d_backward.default: lambda node: bool(node.args[5]),
}
_LIBRARY = torch.library.Library("graphopt", "FRAGMENT")  # noqa: TOR901 - kept for the process


def _kernel_call(op: torch._ops.OpOverload) -> torch._ops.OpOverload:
    """`graphopt::eager_<op>`: the same schema, torch's kernel, opaque to inductor."""
    name = f"eager_{op._schema.name.split('::')[1]}"
    if not hasattr(torch.ops.graphopt, name):
        schema = str(op._schema).split("::", 1)[1].replace(op._schema.name.split("::")[1], name, 1)
        _LIBRARY.define(schema)
        _LIBRARY.impl(name, lambda *args: op(*args), "CompositeExplicitAutograd")
        torch.library.register_fake(f"graphopt::{name}", lambda *args: op(*args), lib=_LIBRARY)
    return getattr(torch.ops.graphopt, name).default


def _keep_mislowered_ops_whole(gm: torch.fx.GraphModule) -> int:
    """Route the nodes inductor would get wrong (`MISLOWERED`) to torch's kernels."""
    count = 0
    for node in gm.graph.nodes:
        wrong = MISLOWERED.get(node.target) if node.op == "call_function" else None
        if wrong is not None and wrong(node):
            node.target = _kernel_call(node.target)
            count += 1
    if count:
        gm.recompile()
    return count


def _donatable(gm: torch.fx.GraphModule, meta: Any) -> list[int]:
    """The saved activations (by backward input index) the backward may still overwrite.

    aot_autograd marks a saved activation the backward's to reuse ("donated") when no input
    or user output of the forward shares its memory, judged on the forward as partitioned.
    graphopt's passes may since have made two saved activations one tensor (a clone removed,
    two equal expressions merged): such a tensor is read twice and must not be overwritten.
    """
    placeholders = gm.graph.find_nodes(op="placeholder")
    outputs = list(gm.graph.output_node().args[0])
    saved = outputs[meta.tensors_saved_for_backwards_slice]
    uses = Counter(storage_of(n) for n in (*placeholders, *outputs) if isinstance(n, torch.fx.Node))
    keep = []
    for index in meta.bw_donated_idxs:
        node = saved[index - meta.num_symints_saved_for_bw]
        storage = storage_of(node) if isinstance(node, torch.fx.Node) else None
        if storage is not None and uses[storage] == 1:
            keep.append(index)
    return keep


def _settings(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], training: bool
) -> dict[str, Any]:
    """Inductor settings for a graph: frozen weights for inference (a training graph's weights
    are inputs that change), the C++ wrapper where it works: inference graphs of static
    shapes without effect tokens (on torch 2.13 its entry point turns every input into a
    tensor, so the `None` token of a side-effecting op (linalg's error checks) and symbolic
    sizes (dynamic shapes) fail at the first call), and, for inference where both GEMM
    libraries are built in, the choice between them per linear (`_LinearGemm`)."""
    static = all(
        isinstance(x, torch.Tensor) and all(isinstance(d, int) for d in x.shape)
        for x in example_inputs
    )
    effects = gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.with_effects)
    settings: dict[str, Any] = {
        "freezing": not training,
        "cpp_wrapper": not training and static and not effects,
    }
    if not training and torch._C.has_mkl and torch.backends.mkldnn.is_available():
        settings["post_grad_custom_pre_pass"] = _LinearGemm()
    return settings


def _release_frozen_weights(fn: Callable[..., Any], gm: torch.fx.GraphModule) -> None:
    """Let go of `gm`'s weights once inductor has frozen them into its own constants.

    Freezing folds and prepacks each weight into a constant of the compiled code, which keeps
    what it still reads (an embedding table, say). The originals stay referenced twice more:
    by `gm` and by the list of parameters that aot_autograd's `forward` (what `compile_fx`
    returns) passes with every call, where the frozen code ignores them. Both are replaced by
    inductor's own `ErasedTensor`s (meta tensors: a PyTorch op on one raises), as
    `freezing_discard_parameters` does for a dynamo graph, so a weight that only those two
    held (one inductor repacked) is freed. Weights that freezing keeps as inputs of the
    compiled code are left alone (`_weights_stay_inputs`). GPT-2 through `graphopt.optimize`
    grew the process by 1,478 MB over the eager model before, 793 MB after (with the
    compiler's `_return_freed_memory`). `gm` keeps its graph but can no longer run.
    """
    from torch._inductor.freezing import ErasedTensor
    from torch.utils._python_dispatch import _disable_current_modes

    if _weights_stay_inputs(gm):
        return
    flat = _closure_variable(fn, "params_buffers_flat")
    if flat is None:
        log.debug("graphopt: inductor's compiled function holds its weights another way")
        return
    erased: dict[int, torch.Tensor] = {}
    with _disable_current_modes(), torch._dispatch.python.no_python_dispatcher():
        weights = [
            *gm.named_parameters(remove_duplicate=False),
            *gm.named_buffers(remove_duplicate=False),
        ]
        for name, tensor in weights:
            owner, _, attr = name.rpartition(".")
            module = gm.get_submodule(owner)
            if id(tensor) not in erased:
                erased[id(tensor)] = ErasedTensor(tensor, attr, module)
            delattr(module, attr)
            module.register_buffer(attr, erased[id(tensor)])
    flat[:] = [erased.get(id(t), t) for t in flat]


def _weights_stay_inputs(gm: torch.fx.GraphModule) -> bool:
    """Whether freezing may keep some of `gm`'s weights as inputs of the compiled code (as
    `replace_params_with_constants` does for a weight written in place or returned as an
    output or a view of one), so that the list aot_autograd passes must keep them. Writes to
    other tensors (a decoder's KV cache, an input) do not keep the weights."""
    weights = {storage_of(n) for n in gm.graph.find_nodes(op="get_attr")}
    if None in weights and any(mutates(n) for n in gm.graph.nodes):
        return True  # a weight whose storage is unknown may be the one written
    weights.discard(None)
    written = (w for n in gm.graph.nodes for w in written_arguments(n))
    outputs = gm.graph.output_node().all_input_nodes
    return any(storage_of(n) in weights for n in (*written, *outputs))


def _closure_variable(fn: Any, name: str) -> Any:
    """The variable `name` that `fn`, or a function it wraps (`__wrapped__`), closes over."""
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None and name in code.co_freevars:
            return fn.__closure__[code.co_freevars.index(name)].cell_contents
        fn = getattr(fn, "__wrapped__", None)
    return None


class _LinearGemm(CustomGraphPass):
    """Moves each fp32 linear that inductor's freezing packed for MKL's GEMM to oneDNN's packed
    GEMM where oneDNN runs its shape faster on this host. Runs on the frozen graph, before
    inductor lowers it (`post_grad_custom_pre_pass`).

    Inductor packs every fp32 linear on x86 for MKL. On the 2-core AMD EPYC (AVX-512) host of
    benchmarks/RESULTS-cpu.md, MKL ran BERT's and GPT-2's linears (128 x 768 x 3072 and the
    like) at 135-145 GFLOP/s and GPT-2's 768 x 50257 LM head at 90, oneDNN at about 200, as
    fast as onnxruntime's MLAS. Which library wins depends on the CPU, so each shape is timed
    once per process (both libraries interleaved, on random data) and the faster one kept.
    Both compute the same product: the choice changes only rounding."""

    def __init__(self) -> None:
        self.moved: Counter[str] = Counter()  # "m x k x n" -> linears moved to oneDNN
        self.kept = 0  # linears left on MKL

    def __call__(self, graph: torch.fx.Graph) -> None:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # real weights packed, real GEMMs timed
            self._move(graph)
        graph.eliminate_dead_code()

    def _move(self, graph: torch.fx.Graph) -> None:
        from torch._inductor.constant_folding import replace_node_with_constant

        gm = graph.owning_module
        mkl_linear = torch.ops.mkl._mkl_linear
        for node in list(graph.nodes):
            if node.target not in (mkl_linear, mkl_linear.default):
                continue
            x, _, weight, bias, m = node.args  # weight: the original one, n x k, frozen
            if weight.op != "get_attr" or not isinstance(m, int):
                continue
            value = getattr(gm, weight.target)
            n, k = value.shape
            if not _onednn_faster(m, k, n):
                self.kept += 1
                continue
            reorder = torch.ops.mkldnn._reorder_linear_weight
            with graph.inserting_before(node):
                packed = graph.call_function(reorder, (weight, m))
                linear = graph.call_function(
                    torch.ops.mkldnn._linear_pointwise.default, (x, packed, bias, "none", [], "")
                )
            replace_node_with_constant(gm, packed, reorder(value, m))
            linear.meta.update(node.meta)
            node.replace_all_uses_with(linear)
            self.moved[f"{m}x{k}x{n}"] += 1

    def note(self) -> str:
        shapes = ", ".join(f"{shape} x{count}" for shape, count in self.moved.items())
        return (
            f"fp32 linears on the GEMM faster here: {sum(self.moved.values())} on oneDNN's"
            + (f" (m x k x n: {shapes})" if shapes else "")
            + f", {self.kept} on MKL's"
        )

    def uuid(self) -> str:  # the choice is the host's: inductor's FX cache is per host
        return "graphopt._LinearGemm.1"


_ONEDNN_FASTER: dict[tuple[int, int, int, int], bool] = {}


def _onednn_faster(m: int, k: int, n: int) -> bool:
    """Whether oneDNN's packed fp32 GEMM beats MKL's on (m x k) @ (k x n) here: medians of 7
    interleaved calls each, once per shape and thread count in a process."""
    from graphopt.bench import compare_speed

    key = (m, k, n, torch.get_num_threads())
    if key not in _ONEDNN_FASTER:
        x, weight, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        onednn = torch.ops.mkldnn._reorder_linear_weight(weight, m)
        mkl = torch.ops.mkl._mkl_reorder_linear_weight(weight, m)
        timings = compare_speed(
            {
                "mkl": lambda: torch.ops.mkl._mkl_linear(x, mkl, weight, bias, m),
                "onednn": lambda: torch.ops.mkldnn._linear_pointwise(
                    x, onednn, bias, "none", [], ""
                ),
            },
            (),
            rounds=7,
            warmup=2,
            settle_s=0.0,
        )
        by_name = {t.name: t.median_ms for t in timings}
        _ONEDNN_FASTER[key] = by_name["onednn"] < by_name["mkl"]
        log.info(
            "graphopt: fp32 GEMM %dx%dx%d: MKL %.3f ms, oneDNN %.3f ms",
            m,
            k,
            n,
            by_name["mkl"],
            by_name["onednn"],
        )
    return _ONEDNN_FASTER[key]
