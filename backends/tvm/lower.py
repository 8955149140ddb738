"""Lower a frozen core-ATen FX graph to a Relax IRModule, compile it with TVM, and call it.

    build_relax(gm, inputs, cfg)      -> tvm.IRModule   (one rule per node, from `rules.TVM`)
    compile_relax(mod, cfg)           -> relax.VMExecutable (build only: works for any target)
    compile_subgraph(gm, inputs, cfg) -> CompiledSubgraph (callable: torch tensors in and out,
                                         passed zero-copy through DLPack; the library is
                                         cached on disk, see `cache.py`)

Shapes come from `node.meta["val"]`; a symbolic dim (a SymInt over sympy symbols like s77)
becomes a `tvm.tirx.Var(name, "int64")` per symbol, bound by the input tensor that carries it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import operator
import os
import platform
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx
import tvm
from tvm import relax, te, tirx, topi
from tvm.s_tir import dlight

from graphopt.backends.registry import op_name
from graphopt.backends.tvm import cache, schedules, tune
from graphopt.backends.tvm.rules import TVM, TVM_DTYPES
from graphopt.config import Config
from graphopt.passes.base import get_attr_value

aten = torch.ops.aten
log = logging.getLogger(__name__)

# TVM's generated kernels assume 64-byte aligned, contiguous buffers (tvm.runtime.from_dlpack
# checks both); torch's CPU and CUDA allocators hand out such memory, views may not be.
ALIGNMENT = 64
# The CUDA architecture used when no GPU is visible to ask (build-only): PTX for sm_80 also
# runs on newer GPUs (Hopper, Blackwell) through the driver's JIT.
DEFAULT_CUDA_ARCH = "sm_80"


def size_thread_pool() -> None:
    """Size TVM's CPU thread pool like torch's: `torch.get_num_threads()` threads, unless
    TVM_NUM_THREADS or OMP_NUM_THREADS is set (then TVM reads that). Left alone, TVM gives x86
    kernels half the CPUs, as if every core were hyper-threaded: one thread on a 2-core host
    without hyper-threads, where every kernel then runs on half the machine. Set in the
    environment, which TVM reads when it starts its pool, at this module's import: before any
    graphopt kernel runs, and inherited by the tuner's measuring processes."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(torch.get_num_threads())


size_thread_pool()


class LoweringError(RuntimeError):
    """A graph the TVM backend cannot build; the caller runs that partition in PyTorch."""

    def __init__(self, node_name: str, reason: str):
        self.node_name = node_name
        self.reason = reason
        super().__init__(f"TVM cannot lower node {node_name!r}: {reason}")


class LoweringContext:
    """What a rule sees: the relax value of each fx argument, and shapes from meta["val"].

    `ctx[arg]` maps an fx Node to its relax expression (a `tirx` expression for SymInt nodes),
    lists elementwise, SymInts to `tirx` expressions, and leaves Python scalars as they are.
    """

    def __init__(self, bb: relax.BlockBuilder, cfg: Config):
        self.bb = bb
        self.cfg = cfg
        self.env: dict[torch.fx.Node, Any] = {}
        self.symbols: dict[str, tirx.Var] = {}  # sympy symbol name -> its tirx.Var
        self.node: torch.fx.Node | None = None  # the node being lowered (for error messages)

    def __getitem__(self, arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            return self.env[arg]
        if isinstance(arg, list | tuple):
            return [self[a] for a in arg]
        if isinstance(arg, torch.SymInt):
            return self.dim(arg)
        return arg

    def emit(self, expr: relax.Expr) -> relax.Var:
        return self.bb.emit(expr)

    def val(self, node: Any) -> Any:
        """The traced value of a node: meta["val"] (a FakeTensor, SymInt or tuple of them)."""
        if not isinstance(node, torch.fx.Node):
            return node
        if "val" not in node.meta:
            raise LoweringError(node.name, "no meta['val'] (run FakeTensorProp first)")
        return node.meta["val"]

    def shape(self, node: Any) -> list[int | tirx.PrimExpr]:
        """The shape of a node's tensor value, symbolic dims as tirx expressions."""
        value = self.val(node) if isinstance(node, torch.fx.Node) else node
        return [self.dim(d) for d in value.shape]

    def dtype(self, node: Any) -> str:
        """The TVM dtype of a node's tensor value (or of a torch.dtype)."""
        dtype = node if isinstance(node, torch.dtype) else self.val(node).dtype
        if dtype not in TVM_DTYPES:
            raise LoweringError(self._where(), f"dtype {dtype} has no TVM equivalent")
        return TVM_DTYPES[dtype]

    def dim(self, d: Any) -> int | tirx.PrimExpr:
        """An int stays an int; a SymInt becomes a tirx expression over the bound symbols."""
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            if expr.is_Integer:
                return int(expr)
            return _sympy_to_tir(expr, self.symbols, self._where())
        return int(d)

    def const(self, value: Any, dtype: str) -> relax.Constant:
        """A scalar relax constant of `dtype`."""
        if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
            raise LoweringError(self._where(), f"symbolic scalar {value} used as a tensor value")
        return relax.const(value, dtype)

    def _where(self) -> str:
        return self.node.name if self.node is not None else "<graph>"


def _sympy_to_tir(expr: Any, symbols: dict[str, tirx.Var], where: str) -> tirx.PrimExpr:
    """Translate a torch shape expression (sympy over s0, s1, ...) to tirx."""
    import sympy
    from torch.utils._sympy.functions import CleanDiv, FloorDiv, Mod, PythonMod

    def convert(e):
        if e.is_Integer:
            return tirx.IntImm("int64", int(e))
        if e.is_Symbol:
            if e.name not in symbols:
                raise LoweringError(where, f"symbol {e.name} is not the size of any input dim")
            return symbols[e.name]
        if isinstance(e, sympy.Add):
            return functools.reduce(operator.add, map(convert, e.args))
        if isinstance(e, sympy.Mul):
            return functools.reduce(operator.mul, map(convert, e.args))
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) > 0:
            return functools.reduce(operator.mul, [convert(e.base)] * int(e.exp))
        if isinstance(e, FloorDiv | CleanDiv):
            return tirx.floordiv(convert(e.args[0]), convert(e.args[1]))
        if isinstance(e, Mod | PythonMod):
            return tirx.floormod(convert(e.args[0]), convert(e.args[1]))
        raise LoweringError(where, f"symbolic size {expr} uses {type(e).__name__}")

    return convert(expr)


def build_relax(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config
) -> tvm.IRModule:
    """Translate `gm` into an IRModule whose "main" takes gm's tensor inputs, in order.

    Args:
        gm: a frozen core-ATen graph (weights are get_attr constants) with meta["val"] on nodes.
        example_inputs: the placeholders' values; only used for their count (shapes and dtypes
            come from meta["val"], so symbolic sizes stay symbolic).
        cfg: the graphopt Config (rules' checks may read it).
    Returns:
        An IRModule with one Relax function "main" returning a tuple of tensors.
    Raises:
        LoweringError: a node has no rule, its rule's check rejects it, or TVM rejects the IR.
    """
    placeholders = gm.graph.find_nodes(op="placeholder")
    if len(example_inputs) != len(placeholders):
        raise LoweringError(
            "<graph>", f"{len(placeholders)} placeholders but {len(example_inputs)} example inputs"
        )
    bb = relax.BlockBuilder()
    ctx = LoweringContext(bb, cfg)
    params = _make_params(gm, ctx)
    with bb.function("main", params):
        with bb.dataflow():
            outputs = []
            for node in gm.graph.nodes:
                ctx.node = node
                if node.op == "get_attr":
                    ctx.env[node] = _constant(gm, node)
                elif node.op == "call_function":
                    ctx.env[node] = _lower_call(ctx, node)
                elif node.op == "output":
                    outputs = _outputs(ctx, node)
                elif node.op != "placeholder":
                    raise LoweringError(node.name, f"{node.op} nodes are not lowered")
            result = bb.emit_output(relax.Tuple(outputs))
        bb.emit_func_output(result)
    return bb.get()


def _make_params(gm: torch.fx.GraphModule, ctx: LoweringContext) -> list[relax.Var]:
    """Relax params for tensor placeholders; SymInt placeholders map to their tirx expression."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    for node in placeholders:  # a symbol is bound by the first input dim that is exactly it
        value = ctx.val(node)
        for d in value.shape if isinstance(value, torch.Tensor) else ():
            if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                name = d.node.expr.name
                ctx.symbols.setdefault(name, tirx.Var(name, "int64"))
    params = []
    for node in placeholders:
        ctx.node = node
        value = ctx.val(node)
        if isinstance(value, torch.Tensor):
            var = relax.Var(node.name, relax.TensorType(ctx.shape(node), ctx.dtype(node)))
            params.append(var)
            ctx.env[node] = var
        elif isinstance(value, torch.SymInt):
            ctx.env[node] = ctx.dim(value)
        else:
            raise LoweringError(node.name, f"input of type {type(value).__name__} (not a tensor)")
    return params


def _constant(gm: torch.fx.GraphModule, node: torch.fx.Node) -> relax.Constant:
    """A get_attr tensor as a relax constant (a copy, so later changes to gm do not leak in)."""
    value = get_attr_value(gm, node)
    if not isinstance(value, torch.Tensor):
        raise LoweringError(node.name, f"get_attr of a {type(value).__name__}, not a tensor")
    if value.dtype not in TVM_DTYPES:
        raise LoweringError(node.name, f"constant of dtype {value.dtype} has no TVM equivalent")
    # A host copy whatever the tensor's device: TVM folds constants on the host and the VM
    # uploads them to the target's device when it loads (a CUDA tensor here would not fold).
    copy = value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
    return relax.const(tvm.runtime.from_dlpack(_compact_strides(copy)))


def _lower_call(ctx: LoweringContext, node: torch.fx.Node) -> Any:
    reason = TVM.unsupported_reason(node, ctx.cfg)
    if reason is not None:
        raise LoweringError(node.name, reason)
    try:
        result = TVM.lookup(node.target).emit(ctx, node)
    except LoweringError:
        raise
    except (ValueError, TypeError, RuntimeError) as err:  # TVM's type inference rejected it
        raise LoweringError(node.name, f"{op_name(node.target)}: {err}") from err
    if result is not None or node.users:  # a dead getitem of an output not computed is fine
        _check_result(ctx, node, node.meta.get("val"), result)
    return result


def _check_result(ctx: LoweringContext, node: torch.fx.Node, expected: Any, got: Any) -> None:
    """A rule's result must have the dtype, rank and static sizes torch traced for the node."""
    if isinstance(expected, torch.Tensor):
        ty = got.ty if isinstance(got, relax.Expr) else None
        if not isinstance(ty, relax.TensorType):
            raise LoweringError(node.name, f"rule returned {type(got).__name__}, not a tensor")
        want_dtype = ctx.dtype(expected.dtype)
        if str(ty.dtype) != want_dtype or ty.ndim != expected.dim():
            raise LoweringError(
                node.name,
                f"rule gave {ty.dtype}[{ty.ndim}d], torch traced {want_dtype}[{expected.dim()}d]",
            )
        sizes = ty.shape.values if isinstance(ty.shape, relax.ShapeExpr) else ()
        for i, (size, want) in enumerate(zip(sizes, expected.shape)):
            if isinstance(size, tirx.IntImm) and not isinstance(want, torch.SymInt):
                if int(size) != int(want):
                    raise LoweringError(
                        node.name,
                        f"rule gave shape {list(sizes)}, torch traced "
                        f"{list(expected.shape)} (dim {i})",
                    )
    elif isinstance(expected, list | tuple) and isinstance(got, list | tuple):
        for want, value in zip(expected, got):
            if value is not None:
                _check_result(ctx, node, want, value)


def _outputs(ctx: LoweringContext, node: torch.fx.Node) -> list[relax.Expr]:
    args = node.args[0]
    args = list(args) if isinstance(args, list | tuple) else [args]
    outputs = []
    for arg in args:
        value = ctx.env.get(arg) if isinstance(arg, torch.fx.Node) else None
        if not isinstance(value, relax.Expr) or not isinstance(value.ty, relax.TensorType):
            raise LoweringError(node.name, f"output {arg} is not a tensor; TVM returns tensors")
        outputs.append(value)
    return outputs


def target_for(cfg: Config) -> tvm.target.Target:
    """The TVM target of a graphopt target: "llvm" (this x86 host), "cuda", "aarch64" (cross)."""
    if cfg.target == "llvm":
        host_cpu = tvm.target.Target.from_device(tvm.cpu()).attrs.get("mcpu")
        return tvm.target.Target({"kind": "llvm", **({"mcpu": host_cpu} if host_cpu else {})})
    if cfg.target == "cuda":
        if tvm.cuda(0).exist:
            return tvm.target.Target.from_device(tvm.cuda(0))
        return tvm.target.Target(
            {"kind": "cuda", "arch": DEFAULT_CUDA_ARCH, "host": {"kind": "llvm"}}
        )
    if cfg.target == "aarch64":
        return tvm.target.Target(
            {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
        )
    raise ValueError(
        f"the TVM backend compiles target='llvm', 'cuda' or 'aarch64', not {cfg.target!r}"
    )


def _erf(x: te.Tensor) -> te.Tensor:
    """float32 erf as topi's rational approximation, which vectorizes (libm's `erff` is a
    scalar call per element, the bulk of BERT's GELU time). Its error is at most 3.3e-7
    against float64 over [-20, 20] (torch's float32 erf: 6e-8; `tests/backends/tvm/
    test_rules.py` checks). topi clamps x to [-4, 4] with max/min, which turns NaN into 1;
    NaN stays NaN here."""
    return topi.where(topi.isnan(x), x, topi.fast_erf(x))


def _gelu(x: te.Tensor) -> te.Tensor:
    return x * (tirx.const(0.5, x.dtype) + _erf(x * tirx.const(0.5**0.5, x.dtype)) * 0.5)


def _gelu_tanh(x: te.Tensor) -> te.Tensor:
    inner = tirx.const(math.sqrt(2.0 / math.pi), x.dtype) * x * (1 + 0.044715 * x * x)
    return 0.5 * x * (1 + topi.fast_tanh(inner))


# Ops whose float32 kernels graphopt builds from vectorizable approximations instead of TVM's
# default legalization (which calls libm one element at a time): op -> (TE function, name).
# fast_tanh is within 3.1e-7 of float64 tanh and keeps NaN; TVM's default tanh is off by up to
# 2.4e-4 relative near 0. exp keeps the default: topi's fast_exp overflows below 88.7 and
# flushes results below 1.2e-38 to 0.
_FAST_FLOAT32 = {
    "relax.erf": (_erf, "erf"),
    "relax.tanh": (topi.fast_tanh, "tanh"),
    "relax.nn.gelu": (_gelu, "gelu"),
    "relax.nn.gelu_tanh": (_gelu_tanh, "gelu_tanh"),
}


def _fast_legalize(op_name: str) -> Any:
    te_fn, name = _FAST_FLOAT32[op_name]
    default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if str(call.args[0].ty.dtype) != "float32":
            return default(bb, call)
        return bb.call_te(te_fn, call.args[0], primfunc_name_hint=name)

    return legalize


def optimize_relax(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """`mod` legalized to TIR and fused (inference simplifications, then Relax's "zero"
    pipeline: LegalizeOps, FoldConstant, FuseOps, FuseTIR); no kernel is scheduled yet.
    Its kernels are what `graphopt.tune` tunes and what the tuning database is keyed by.
    erf, tanh and GELU in float32 get vectorizable kernels (`_FAST_FLOAT32`)."""
    passes = [
        relax.transform.DecomposeOpsForInference(),  # batch_norm -> arithmetic, etc.
        relax.transform.CanonicalizeBindings(),
        relax.transform.LegalizeOps({op: _fast_legalize(op) for op in _FAST_FLOAT32}),
        relax.get_pipeline("zero"),  # its LegalizeOps finds nothing left to legalize
        # each kernel's constant operands (weights) marked layout-free: a schedule (default
        # or tuned) may read them packed, repacked once at compile time (schedule_relax)
        relax.transform.AttachAttrLayoutFreeBuffers(),
    ]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def compile_relax(
    mod: tvm.IRModule,
    cfg: Config,
    target: tvm.target.Target | None = None,
    tuning: tune.TuningDatabase | None | str = "auto",
) -> relax.VMExecutable:
    """Optimize and compile `mod` for `target` (default: `target_for(cfg)`); nothing runs.

    Pipeline: `optimize_relax`, then `_schedule_and_build`: the tuning database's schedules
    for the kernels it holds (`tuning`: "auto" looks up `tune.database_for(target)`; None
    compiles untuned), default schedules for the other kernels (`schedules.cpu_rules`
    for llvm, dlight's GPU rules for CUDA), then `tvm.compile`.
    """
    target = target or target_for(cfg)
    if tuning == "auto":
        tuning = tune.database_for(target)
    executable, _ = _schedule_and_build(optimize_relax(mod, target), target, tuning)
    return executable


def _schedule_and_build(
    mod: tvm.IRModule, target: tvm.target.Target, tuning: tune.TuningDatabase | None
) -> tuple[relax.VMExecutable, tuple[int, int]]:
    """Schedule and compile an `optimize_relax` module; (the executable, (TIR functions,
    those the tuning database scheduled))."""
    mod, counts = schedule_relax(mod, target, tuning)
    # "default_build" lowers the (already legalized) module to VM code without re-fusing.
    return tvm.compile(mod, target=target, relax_pipeline="default_build"), counts


def schedule_relax(
    mod: tvm.IRModule, target: tvm.target.Target, tuning: tune.TuningDatabase | None
) -> tuple[tvm.IRModule, tuple[int, int]]:
    """An `optimize_relax` module with every kernel scheduled: the tuning database's schedule
    where it has one, a default schedule otherwise (`schedules.cpu_rules` for llvm, dlight's
    GPU rules for CUDA); weights a schedule reads packed are repacked here, once. (The
    module, (TIR functions, those the tuning database scheduled)). `mod` is left as it was
    (dlight's pass replaces functions in the module it is given, and `collect_kernels` hands
    `mod` to tuning)."""
    mod = mod.clone()
    if tuning is not None:
        mod = tune.apply_database(mod, target, tuning)
    counts = tune.count_scheduled(mod)
    if target.kind.name == "cuda":  # GPU kernels need thread bindings; dlight gives each one
        rules = (
            dlight.gpu.Matmul(),
            dlight.gpu.GEMV(),
            dlight.gpu.Reduction(),
            dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback(),
        )
    else:
        rules = schedules.cpu_rules(target)
    with target:  # the kernels the tuning database has no schedule for
        mod = dlight.ApplyDefaultSchedule(*rules)(mod)
        # weights a schedule reads packed: the repacking split out of the kernel into its own
        # function, run on the constant weights now, and dropped (no call repacks them)
        mod = relax.transform.SplitLayoutRewritePreproc()(mod)
        mod = relax.transform.FoldConstant()(mod)
        mod = relax.transform.DeadCodeElimination()(mod)
    return mod, counts


_collectors: list[list[tvm.IRModule]] = []


@contextlib.contextmanager
def collect_kernels() -> Iterator[list[tvm.IRModule]]:
    """Within the block, each graph `compile_subgraph` compiles (or loads from the cache) also
    appends its `optimize_relax` module to the yielded list: what `graphopt.tune` tunes."""
    mods: list[tvm.IRModule] = []
    _collectors.append(mods)
    try:
        yield mods
    finally:
        _collectors.remove(mods)


# Ops whose output torch returns as a view of their input (an output reached from a graph
# input through these only may alias that input; any other output must not).
_VIEW_OPS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten.permute.default,
    aten.t.default,
    aten.transpose.int,
    aten.expand.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.alias.default,
}


def _views_an_input(node: Any) -> bool:
    while isinstance(node, torch.fx.Node) and node.target in _VIEW_OPS:
        node = node.args[0]
    return isinstance(node, torch.fx.Node) and node.op == "placeholder"


class CompiledSubgraph:
    """A compiled graph: call it with gm's inputs (torch tensors); returns a tuple of tensors.

    Tensors cross to TVM and back through DLPack without copies. SymInt inputs are ignored
    (TVM binds symbolic sizes from the tensors' shapes). An output that TVM hands back in an
    input's or an earlier output's memory (clone() lowers to nothing) is copied where torch
    returns a tensor of its own, so writing to it changes nothing else.

    Devices: an input on another device than the module's (a CPU tensor for a CUDA module) is
    copied to it, and each output is returned on the device torch traced it on (`for_graph`;
    without a graph, a loaded library: on the first input's device). So a CPU model compiled
    for target="cuda" takes and returns CPU tensors (two copies per call) and a model on the
    GPU stays there (none).

    Attributes:
        mod: the Relax IRModule it was compiled from; None when loaded from the disk cache.
        executable: the compiled VM executable (built, or loaded from the cache).
        cache_hit: whether the executable came from the disk cache (nothing was compiled).
        schedules: how many kernels have tuned schedules ("3/19 kernels tuned"; None: no
            tuning database for the target).
        compile_seconds: wall time of `compile_subgraph` (build + compile + store, or load).
    """

    def __init__(
        self,
        executable: relax.VMExecutable,
        device: tvm.runtime.Device,
        *,
        tensor_inputs: Sequence[bool],
        fresh_outputs: Sequence[int] | None = None,
        output_devices: Sequence[torch.device | None] | None = None,
        mod: tvm.IRModule | None = None,
        cache_hit: bool = False,
    ):
        """
        Args:
            tensor_inputs: per input, whether it is a tensor (False: a SymInt, not passed on).
            fresh_outputs: the outputs that must not share memory with an input or an earlier
                output (None: all of them).
            output_devices: per output, the device to return it on (None for all: the first
                tensor input's device).
        """
        self.mod = mod
        self.executable = executable
        self.cache_hit = cache_hit
        self.schedules: str | None = None
        self.compile_seconds = 0.0
        self.vm = relax.VirtualMachine(executable, device)
        self._main = self.vm["main"]
        self._tensor_inputs = tuple(tensor_inputs)
        self._fresh_outputs = None if fresh_outputs is None else tuple(fresh_outputs)
        self._device = (
            torch.device("cuda", device.index) if device.type == "cuda" else torch.device("cpu")
        )
        self._output_devices = None if output_devices is None else tuple(output_devices)

    @classmethod
    def for_graph(
        cls,
        gm: torch.fx.GraphModule,
        executable: relax.VMExecutable,
        device: tvm.runtime.Device,
        **kwargs: Any,
    ) -> CompiledSubgraph:
        """The compiled form of `gm`: its placeholders are the inputs; an output torch returns
        as a view of an input may stay one, every other output gets memory of its own."""
        out = gm.graph.find_nodes(op="output")[0].args[0]
        outs = out if isinstance(out, list | tuple) else [out]
        return cls(
            executable,
            device,
            tensor_inputs=[
                isinstance(node.meta.get("val"), torch.Tensor)
                for node in gm.graph.find_nodes(op="placeholder")
            ],
            fresh_outputs=[i for i, n in enumerate(outs) if not _views_an_input(n)],
            output_devices=[
                v.device if isinstance(v := n.meta.get("val"), torch.Tensor) else None for n in outs
            ],
            **kwargs,
        )

    def __call__(self, *args: Any) -> tuple[torch.Tensor, ...]:
        if len(args) != len(self._tensor_inputs):
            raise TypeError(f"expected {len(self._tensor_inputs)} inputs, got {len(args)}")
        tensors = [a for a, is_tensor in zip(args, self._tensor_inputs) if is_tensor]
        inputs = [self._prepare(t) for t in tensors]
        results = self._main(*[tvm.runtime.from_dlpack(t) for t in inputs])
        outputs = [torch.from_dlpack(r) for r in results]
        fresh = range(len(outputs)) if self._fresh_outputs is None else self._fresh_outputs
        for i in fresh:  # torch gives these memory of their own
            if any(_within(outputs[i], t) for t in [*inputs, *outputs[:i]]):
                outputs[i] = outputs[i].clone()
        devices = self._output_devices
        if devices is None and tensors:
            devices = [tensors[0].device] * len(outputs)
        for i, device in enumerate(devices or ()):
            if device is not None and outputs[i].device != device:
                outputs[i] = outputs[i].to(device)
        return tuple(outputs)

    def _prepare(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor itself when TVM can read it in place (contiguous, aligned), else a copy."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor input, got {type(tensor).__name__}")
        tensor = tensor.detach()
        if tensor.device != self._device:
            tensor = tensor.to(self._device)
        if not tensor.is_contiguous() or tensor.data_ptr() % ALIGNMENT:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        return _compact_strides(tensor)


def _compact_strides(tensor: torch.Tensor) -> torch.Tensor:
    """An empty tensor restrided the way TVM checks it (torch gives (0, 0) strides (1, 1))."""
    if tensor.numel() != 0:
        return tensor
    strides = [math.prod(tensor.shape[i + 1 :]) for i in range(tensor.dim())]
    return tensor.as_strided(tensor.shape, strides)


def _within(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a`'s data starts inside `b`'s memory."""
    return b.data_ptr() <= a.data_ptr() < b.data_ptr() + max(b.nbytes, 1)


def runtime_device(cfg: Config) -> tvm.runtime.Device:
    """The device a compiled module for `cfg.target` runs on here, or a clear error why none."""
    if cfg.target == "cuda":
        if not tvm.cuda(0).exist:
            raise RuntimeError(
                "target='cuda' needs a CUDA GPU visible to TVM; none found (tvm.cuda(0).exist "
                "is False). Use target='llvm' on this machine, or build without running via "
                "graphopt.backends.tvm.compile_relax(build_relax(...), cfg)."
            )
        return tvm.cuda(0)
    if cfg.target == "aarch64":
        if platform.machine().lower() not in ("aarch64", "arm64"):
            raise RuntimeError(
                f"target='aarch64' is cross-compiled for export and cannot run on this "
                f"{platform.machine()} host; use graphopt.export(..., format='tvm') and run the "
                "library on an ARM machine (or under qemu-aarch64)."
            )
        return tvm.cpu()
    target_for(cfg)  # raises for targets TVM does not handle
    return tvm.cpu()


def compile_subgraph(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config
) -> CompiledSubgraph:
    """Build, compile and load `gm` for `cfg.target`; returns a callable over torch tensors.

    The library is looked up first in the disk cache (`cache.graph_key`: the whole graph,
    constants, input specs, options, target and versions); a miss compiles and stores it.

    Raises:
        LoweringError: the graph cannot be built (the caller runs it in PyTorch instead).
        RuntimeError: the target cannot run here (CUDA without a GPU, aarch64 on x86).
    """
    start = time.perf_counter()
    device = runtime_device(cfg)  # fail before the (slow) build
    target = target_for(cfg)
    tuning = tune.database_for(target)
    root, key = cache.cache_root(), None
    if root is not None:
        try:
            key = cache.graph_key(gm, cfg, target, tuning.digest if tuning else None)
        except cache.UncacheableGraph as err:
            log.info("graphopt: not caching this TVM graph: %s", err)
    compiled = None
    executable = cache.load(root, key) if key else None
    if executable is not None:
        try:
            compiled = CompiledSubgraph.for_graph(gm, executable, device, cache_hit=True)
        except (RuntimeError, ValueError) as err:  # the library loaded but its VM does not start
            cache.evict(root, key, f"its VM does not start: {err}")
    optimized = None  # the unscheduled kernels: what collect_kernels hands to tuning
    if compiled is None:
        mod = build_relax(gm, example_inputs, cfg)
        optimized = optimize_relax(mod, target)
        executable, (kernels, tuned) = _schedule_and_build(optimized, target, tuning)
        if key:
            cache.store(root, key, executable)
        compiled = CompiledSubgraph.for_graph(gm, executable, device, mod=mod)
        if tuning is not None:
            compiled.schedules = f"{tuned}/{kernels} kernels tuned"
    elif tuning is not None:
        compiled.schedules = "built with the tuning database"
    if _collectors:
        optimized = optimized or optimize_relax(build_relax(gm, example_inputs, cfg), target)
        for mods in _collectors:
            mods.append(optimized)
    compiled.compile_seconds = time.perf_counter() - start
    return compiled


def cuda_source(executable: relax.VMExecutable) -> str:
    """The CUDA C that TVM embedded in a library built for target="cuda" (all kernels)."""

    def modules(mod: Any) -> Any:
        yield mod
        for imported in mod.imports:
            yield from modules(imported)

    return "".join(m.inspect_source() for m in modules(executable.mod) if m.kind == "cuda")


def compile_cuda_kernels(executable: relax.VMExecutable, target: tvm.target.Target) -> int:
    """Compile the embedded kernels to PTX with nvcc (no GPU needed): a kernel that does not
    compile raises here instead of at load on the user's GPU. Returns the number of kernels.

    Raises:
        RuntimeError: nvcc is not on PATH, or it rejects the source (its message included).
    """
    import shutil

    from tvm.support import nvcc

    if shutil.which("nvcc") is None:
        raise RuntimeError("nvcc is not on PATH (install the CUDA toolkit to check CUDA kernels)")
    source = cuda_source(executable)
    with target:
        ptx = nvcc.compile_cuda(
            source, target_format="ptx", arch=str(target.attrs["arch"]), compiler="nvcc"
        )
    return bytes(ptx).count(b".entry")
