"""target="xla": graphopt's graph as a JAX function compiled by XLA (the CPU here; a TPU or GPU
wherever JAX has one), and format="stablehlo": the same function serialized by `jax.export`.

Partitions of supported nodes become JAX functions (`translate.build_jax`, rules in `rules/`)
over the graph's constants and inputs, jitted by XLA; tensors cross between torch and JAX
through DLPack. torch_xla has no release for torch 2.13, and torchax (the maintained ATen ->
JAX mapping) does not import with it (docs/xla.md): the rules are graphopt's own, as for TVM.

Artifacts: `model.stablehlo` (a serialized `jax.export.Exported`, StableHLO with its
compatibility guarantees, lowered for every platform asked for), `weights.safetensors` (the
constants, passed as the first arguments, in the manifest's order; nothing pickled) and
`model.mlir` (the StableHLO text, for readers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.fx

from graphopt.backends.base import Backend, Compiled, ExportJob
from graphopt.backends.xla.rules import XLA, XLA_DTYPES
from graphopt.backends.xla.translate import JaxGraph, LoweringError, build_jax
from graphopt.config import Config
from graphopt.errors import UnsupportedOpError

PLATFORMS = ("cpu", "tpu", "cuda", "rocm")  # what jax.export lowers for
DEFAULT_PLATFORMS = ("cpu", "tpu")
WEIGHTS_FILE = "weights.safetensors"
MLIR_FILE = "model.mlir"
# XLA may skip rounding a float16/bfloat16 intermediate to its type (a convert pair removed,
# "excess precision"); torch rounds every op's result, and so must the program (bfloat16
# x ** (y / 3) would use y / 3 unrounded). Rules that compute in float32 say so
# (`elementwise._in_float32`).
COMPILER_OPTIONS = {"xla_allow_excess_precision": False}


class XLABackend(Backend):
    label = "xla"
    registry = XLA
    model_file = "model.stablehlo"
    versions = ("jax", "jaxlib")

    def compile(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        cfg: Config,
        *,
        training: bool = False,
        backward: bool = False,
    ) -> Compiled:
        graph = build_jax(gm, cfg)
        runner = XLARunner(graph)
        runner.compile_for(example_inputs)  # rule errors surface here: the piece runs in torch
        return Compiled(runner, note=f"XLA on {runner.device.platform}")

    # ------------------------------------------------------------------------ artifacts

    def export_options(self, cfg: Config, options: Any) -> tuple[str, ...]:
        """The platforms to lower for (`graphopt.export(platforms=...)`), default cpu and tpu."""
        if options is None:
            return DEFAULT_PLATFORMS
        platforms = (options,) if isinstance(options, str) else tuple(options)
        bad = [p for p in platforms if p not in PLATFORMS]
        if bad or not platforms:
            raise ValueError(
                f"platforms={options!r}: accepted values are one or more of {list(PLATFORMS)}"
            )
        return platforms

    def check_export(self, gm: torch.fx.GraphModule, cfg: Config) -> None:
        from graphopt.passes.partition import unsupported_nodes

        missing = unsupported_nodes(gm, XLA, cfg)
        if missing:
            raise UnsupportedOpError(
                cfg.target, missing, why="a StableHLO artifact cannot run them in PyTorch"
            )

    def write(self, job: ExportJob, folder: Path) -> dict[str, Any]:
        from jax import export
        from safetensors.numpy import save_file

        graph = build_jax(job.gm, job.cfg)
        platforms = list(job.options)
        job.say(f"lowering to StableHLO for {', '.join(platforms)} (jax.export)")
        scope = export.SymbolicScope()
        input_specs = [_symbolic_spec(n, job.dim_names, scope) for n in graph.input_nodes]
        param_specs = [jax.ShapeDtypeStruct(tuple(p.shape), _jax_dtype(p)) for p in graph.params]
        count = len(graph.params)

        def flat(*arrays):
            return graph.fn(list(arrays[:count]), list(arrays[count:]))

        with jax.enable_x64(True):
            try:
                exported = export.export(jax.jit(flat), platforms=platforms)(
                    *param_specs, *input_specs
                )
            except LoweringError as err:
                raise UnsupportedOpError(
                    job.cfg.target,
                    [(err.node_name, "node", err.reason)],
                    why="a StableHLO artifact cannot run them in PyTorch",
                ) from err
        (folder / self.model_file).write_bytes(exported.serialize())
        (folder / MLIR_FILE).write_text(exported.mlir_module())
        names = [f"{i:04d}.{name}" for i, name in enumerate(graph.param_names)]
        save_file({n: _to_numpy(p) for n, p in zip(names, graph.params)}, folder / WEIGHTS_FILE)
        job.say(f"wrote {self.model_file}, {MLIR_FILE} and {WEIGHTS_FILE} ({count} tensors)")
        return {
            "stablehlo": {
                "platforms": platforms,
                "weights_file": WEIGHTS_FILE,
                "weights": names,
                "call": "Exported.call(*weights in this order, *inputs) -> tuple of outputs",
                "x64": "run under jax.enable_x64(True): 64-bit integer inputs and outputs",
            }
        }

    def where_artifact_runs(self, cfg: Config) -> str:
        return f"in JAX (XLA:{jax.devices()[0].platform.upper()})"

    def load(self, folder: Path, manifest: dict[str, Any]) -> Callable[..., Any]:
        from jax import export
        from safetensors.numpy import load_file

        section = manifest["stablehlo"]
        exported = export.deserialize(bytearray((folder / manifest["model"]).read_bytes()))
        stored = load_file(folder / section["weights_file"])
        with jax.enable_x64(True):
            weights = [jnp.asarray(stored[name]) for name in section["weights"]]

        def run(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with jax.enable_x64(True):
                outputs = exported.call(*weights, *(_to_jax(a) for a in args))
            return tuple(_to_torch(o) for o in outputs)

        return run


def _jax_dtype(t: Any) -> Any:
    return XLA_DTYPES[t.dtype]


def _symbolic_spec(node: torch.fx.Node, dim_names: dict[str, str], scope: Any) -> Any:
    """An input's shape for jax.export: static sizes as ints, dynamic dims as symbolic
    dimensions named as the user's Dims (torch's symbol name otherwise)."""
    from jax import export

    value = node.meta["val"]
    sizes = []
    for d in value.shape:
        if isinstance(d, torch.SymInt) and not d.node.expr.is_Integer:
            if not d.node.expr.is_Symbol:
                raise ValueError(
                    f"input {node.name} has dim {d.node.expr}: a StableHLO artifact takes "
                    "dynamic dims that are one symbol each"
                )
            name = str(d.node.expr)
            sizes.append(dim_names.get(name, name))
        else:
            sizes.append(str(int(d)))
    shape = export.symbolic_shape(", ".join(sizes), scope=scope) if sizes else ()
    return jax.ShapeDtypeStruct(shape, XLA_DTYPES[value.dtype])


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """Through JAX (numpy has no bfloat16, JAX's ml_dtypes has), in x64 mode: int64 stays."""
    with jax.enable_x64(True):
        return np.asarray(_to_jax(t))


def _to_jax(t: torch.Tensor) -> Any:
    """A torch CPU tensor as a JAX array over the same memory (DLPack)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    strides = tuple(math.prod(t.shape[i + 1 :]) for i in range(t.dim()))
    if t.stride() != strides:  # a size-1 dim's stride: any is contiguous to torch, not to XLA
        t = t.as_strided(t.shape, strides)
    return jnp.from_dlpack(t)


def _argument(t: torch.Tensor) -> Any:
    """A torch CPU tensor as an argument of a jitted call, over the same memory: a numpy view,
    which JAX's CPU client takes without a copy and with less work per call than DLPack's
    import; bfloat16, which numpy lacks, through DLPack."""
    if t.dtype is torch.bfloat16 or t.device.type != "cpu":
        return _to_jax(t)
    return t.detach().numpy()


def _to_torch(a: Any) -> torch.Tensor:
    """A JAX array as a torch tensor: its memory when it is on the CPU (DLPack), else a copy."""
    if a.devices().pop().platform == "cpu":
        return torch.from_dlpack(a)
    return torch.from_numpy(np.asarray(a))


def _hint(d: Any) -> int:
    if isinstance(d, torch.SymInt):
        return int(d.node.hint) if d.node.hint is not None else int(d.node.expr)
    return int(d)


class XLARunner:
    """A graph compiled by XLA: call it with the graph's placeholders (torch tensors; SymInts
    are ignored: sizes come from the tensors); returns a tuple of torch tensors.

    The constants are copied to the JAX device once. Inputs cross without a copy (numpy views,
    which JAX's CPU client takes as they are; DLPack for bfloat16), outputs through DLPack,
    except one that XLA hands back in an input's or a constant's memory, which is copied
    (torch returns a tensor of its own). The program compiled for the example shapes is kept;
    other shapes go through `jax.jit`, which compiles each once.
    """

    def __init__(self, graph: JaxGraph):
        self.graph = graph
        self.device = jax.devices()[0]
        self.tensor_inputs = graph.tensor_inputs
        with jax.enable_x64(True):
            self.params = [jax.device_put(_to_jax(p).copy(), self.device) for p in graph.params]
        # an output in a constant's memory (a runtime may return a constant as it is): copied
        self.param_pointers = {p.unsafe_buffer_pointer() for p in self.params}
        self.jitted = jax.jit(graph.fn, compiler_options=COMPILER_OPTIONS)
        self.dtypes = [n.meta["val"].dtype for n in graph.input_nodes]
        self.shapes: tuple[tuple[int, ...], ...] | None = None
        self.compiled: Any = None

    def compile_for(self, example_inputs: Sequence[Any]) -> None:
        """Trace and compile for the example inputs' shapes (fake tensors are fine)."""
        specs = [
            jax.ShapeDtypeStruct(tuple(_hint(d) for d in x.shape), XLA_DTYPES[x.dtype])
            for x, is_tensor in zip(example_inputs, self.tensor_inputs)
            if is_tensor
        ]
        with jax.enable_x64(True):
            self.compiled = self.jitted.lower(self.params, specs).compile()
        self.shapes = tuple(s.shape for s in specs)

    def __call__(self, *args: Any) -> tuple[torch.Tensor, ...]:
        tensors = [a for a, is_tensor in zip(args, self.tensor_inputs) if is_tensor]
        with jax.enable_x64(True):  # before DLPack too: int64 tensors would arrive as int32
            arrays = [_argument(self._as_traced(i, t)) for i, t in enumerate(tensors)]
            fn = self.compiled if tuple(a.shape for a in arrays) == self.shapes else self.jitted
            outputs = fn(self.params, arrays)
        results = tuple(_to_torch(o) for o in outputs)
        if any(r.numel() for r in results):
            pointers = self.param_pointers.union(t.data_ptr() for t in tensors)
            results = tuple(r.clone() if r.data_ptr() in pointers else r for r in results)
        return results

    def _as_traced(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """Input `i` in the dtype torch traced for it. They differ where an op's fake kernel
        and its CPU kernel disagree (training batch norm of float16 traces float32 running
        stats and computes float16 ones): a widening cast keeps every value, so the program
        computes what it was traced for; a narrowing one is refused, not guessed at."""
        want = self.dtypes[i]
        if t.dtype == want:
            return t
        if t.dtype in XLA_DTYPES and jnp.can_cast(XLA_DTYPES[t.dtype], XLA_DTYPES[want], "safe"):
            return t.to(want)
        raise TypeError(f"XLA program input {i} is {t.dtype}, but torch traced it as {want}")
