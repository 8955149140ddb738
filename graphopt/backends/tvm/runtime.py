"""Running a compiled Relax VM executable on torch tensors: `CompiledSubgraph` (zero-copy
through DLPack) and `runtime_device` (where a target's code runs here, or why it cannot)."""

from __future__ import annotations

import logging
import math
import os
import platform
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import tvm
from tvm import relax

from graphopt.config import Config
from graphopt.ops import VIEWS

aten = torch.ops.aten
log = logging.getLogger(__name__)

# TVM's generated kernels assume 64-byte aligned, contiguous buffers (tvm.runtime.from_dlpack
# checks both); torch's CPU and CUDA allocators hand out such memory, views may not be.
ALIGNMENT = 64


def size_thread_pool() -> None:
    """Size TVM's CPU thread pool like torch's: `torch.get_num_threads()` threads, unless
    TVM_NUM_THREADS or OMP_NUM_THREADS is set (then TVM reads that). Left alone, TVM gives x86
    kernels half the CPUs, as if every core were hyper-threaded: one thread on a 2-core host
    without hyper-threads, where every kernel then runs on half the machine. Set in the
    environment, which TVM reads when it starts its pool: called before anything runs TVM
    code (constant folding while building, a compiled graph, the tuner, whose measuring
    processes inherit it)."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(torch.get_num_threads())


def _views_an_input(node: Any) -> bool:
    while isinstance(node, torch.fx.Node) and node.target in VIEWS:
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
        size_thread_pool()
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
        return compact_strides(tensor)


def compact_strides(tensor: torch.Tensor) -> torch.Tensor:
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
    if cfg.target != "llvm":
        raise ValueError(
            f"the TVM backend runs target='llvm', 'cuda' or 'aarch64', not {cfg.target!r}"
        )
    return tvm.cpu()
