"""Relax -> a compiled VM executable: legalize and fuse (`optimize_relax`), schedule each kernel
(the tuning database's schedule where it has one, else graphopt's default CPU schedules or
dlight's GPU ones: `schedule_relax`) and build (`compile_relax`); `target_for` gives the TVM
target of a graphopt target; `compile_cuda_kernels` checks CUDA kernels with nvcc, no GPU
needed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
import tvm
from tvm import relax, te, tirx, topi
from tvm.s_tir import dlight

from graphopt.backends.tvm import schedules, tune
from graphopt.backends.tvm.runtime import size_thread_pool
from graphopt.config import Config

aten = torch.ops.aten
log = logging.getLogger(__name__)

# The CUDA architecture used when no GPU is visible to ask (build-only): PTX for sm_80 also
# runs on newer GPUs (Hopper, Blackwell) through the driver's JIT.
DEFAULT_CUDA_ARCH = "sm_80"


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
    size_thread_pool()  # constant folding runs kernels
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
