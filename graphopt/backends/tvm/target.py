"""targets "llvm" (x86), "aarch64" (cross-compiled ARM) and "cuda": Apache TVM as a graphopt
`Backend`. Partitions of supported nodes become Relax functions (`lower.compile_subgraph`);
artifacts are one shared library (model.so) with the weights embedded, whose Relax VM
function "main" takes the model's inputs and returns a tuple."""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
import tvm

from graphopt.backends.base import Backend, Compiled, ExportJob
from graphopt.backends.tvm.build import compile_relax, target_for
from graphopt.backends.tvm.lower import compile_subgraph
from graphopt.backends.tvm.rules import TVM
from graphopt.backends.tvm.runtime import CompiledSubgraph, runtime_device, size_thread_pool
from graphopt.backends.tvm.translate import build_relax
from graphopt.config import Config
from graphopt.errors import UnsupportedOpError

log = logging.getLogger("graphopt")


class TVMBackend(Backend):
    registry = TVM
    model_file = "model.so"
    versions = ("tvm", "tvm_ffi")

    def __init__(self, target: Any):
        super().__init__(target)
        size_thread_pool()  # before anything runs TVM code in this process

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"tvm-{self.name}"

    def check_runs_here(self, cfg: Config) -> None:
        super().check_runs_here(cfg)
        runtime_device(cfg)  # no GPU: one clear error, not a fallback per piece

    def compile(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        cfg: Config,
        *,
        training: bool = False,
        backward: bool = False,
    ) -> Compiled:
        fn = compile_subgraph(gm, example_inputs, cfg)
        return Compiled(fn, cache_hit=fn.cache_hit, schedules=fn.schedules)

    # ------------------------------------------------------------------------ artifacts

    def export_options(self, cfg: Config, options: Any) -> tvm.target.Target:
        """graphopt's TVM target for cfg.target, or `options` (a TVM target as a JSON dict,
        `graphopt.export(tvm_target=...)`) after checking it is of that kind."""
        if options is None:
            return target_for(cfg)
        if not isinstance(options, dict):
            raise ValueError(f"tvm_target must be a dict (TVM target JSON), got {options!r}")
        spec = dict(options)
        if spec.get("kind") == "cuda":
            spec.setdefault("host", {"kind": "llvm"})
        try:
            target = tvm.target.Target(spec)
        except Exception as err:  # noqa: BLE001 - TVM raises its own error types
            raise ValueError(f"tvm_target {options!r} is not a valid TVM target: {err}") from err
        arm = str(target.attrs.get("mtriple", "")).startswith("aarch64")
        kind = "cuda" if cfg.target == "cuda" else "llvm"
        if target.kind.name != kind or arm != (cfg.target == "aarch64"):
            raise ValueError(
                f"tvm_target {options!r} does not build for target={cfg.target!r}: it needs kind "
                f"{kind!r}"
                + (" with an aarch64 mtriple" if cfg.target == "aarch64" else "")
                + (" and no aarch64 mtriple" if cfg.target == "llvm" else "")
            )
        return target

    def check_export(self, gm: torch.fx.GraphModule, cfg: Config) -> None:
        from graphopt.passes.partition import unsupported_nodes

        missing = unsupported_nodes(gm, TVM, cfg)
        if missing:
            raise UnsupportedOpError(
                cfg.target, missing, why="a TVM artifact cannot run them in PyTorch"
            )

    def write(self, job: ExportJob, folder: Path) -> dict[str, Any]:
        """model.so; the manifest's "tvm" section: the TVM target, the CPU features an aarch64
        library needs, and for CUDA whether nvcc compiled its kernels."""
        target = job.options
        job.say(f"compiling with TVM for {self.name} ({target})")
        executable = compile_relax(
            build_relax(job.gm, job.example_inputs, job.cfg), job.cfg, target
        )
        path = folder / self.model_file
        build: dict[str, Any] = {
            "target": _plain(target.export()),
            "entry": "main",
            "runtime": "relax.VirtualMachine",
            "cpu_features": [],
        }
        if self.name == "aarch64":
            from graphopt.backends.tvm import aarch64

            aarch64.export_library(executable, path)
            build["cpu_features"] = [str(f).lstrip("+") for f in target.attrs.get("mattr", [])]
            return {"tvm": build}
        executable.export_library(str(path))
        if self.name == "cuda":
            from graphopt.backends.tvm.build import compile_cuda_kernels

            try:
                kernels = compile_cuda_kernels(executable, target)
                build["nvcc"] = f"{kernels} kernels compiled to PTX for {target.attrs['arch']}"
            except RuntimeError as err:
                build["nvcc"] = f"not checked: {err}"
                if "not on PATH" not in str(err):
                    raise
            job.say(f"CUDA kernels: {build['nvcc']}")
        return {"tvm": build}

    def where_artifact_runs(self, cfg: Config) -> str | dict[str, Any]:
        if self.name == "llvm" or (self.name == "aarch64" and _arm_host()):
            return "in process (TVM runtime)"
        if self.name == "aarch64":
            from graphopt.backends.tvm import aarch64

            missing = aarch64.missing_tools()
            if missing:
                return {"ran": False, "reason": f"no aarch64 emulator here: missing {missing}"}
            return "under qemu-aarch64 (graphopt/backends/tvm/runner)"
        if tvm.cuda(0).exist:
            return "on the GPU (TVM runtime)"
        return {"ran": False, "reason": "no CUDA GPU here"}

    def load(self, folder: Path, manifest: dict[str, Any]) -> Callable[..., Any]:
        from tvm import relax

        library = folder / manifest["model"]
        built_with = manifest["versions"].get("tvm")
        if built_with != tvm.__version__:
            log.warning(
                "graphopt: %s was built with TVM %s, this is TVM %s",
                library,
                built_with,
                tvm.__version__,
            )
        if self.name == "aarch64":
            runner = _aarch64_runner(library, manifest["tvm"]["cpu_features"], _arm_host())
            if runner is not None:
                return runner
        if self.name == "cuda" and not tvm.cuda(0).exist:
            raise RuntimeError(f"{library} is a CUDA library and this machine has no CUDA GPU")
        if self.name == "llvm":
            built_for = manifest["tvm"]["target"].get("mcpu")
            here = tvm.target.Target.from_device(tvm.cpu()).attrs.get("mcpu")
            if built_for and built_for != here and not str(built_for).startswith("x86-64"):
                log.warning(
                    "graphopt: %s was compiled for x86 CPU %s, this one is %s: it fails if it "
                    "uses instructions this CPU lacks (re-export on this machine to be sure)",
                    library,
                    built_for,
                    here,
                )
        device = tvm.cuda(0) if self.name == "cuda" else tvm.cpu()
        executable = relax.VMExecutable(tvm.runtime.load_module(str(library)))
        return CompiledSubgraph(executable, device, tensor_inputs=[True] * len(manifest["inputs"]))


def _arm_host() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def _aarch64_runner(
    library: Path, features: list[str], arm_host: bool
) -> Callable[..., Any] | None:
    """On an x86 host, a function running the aarch64 library under qemu (the runner checks
    the features); on an ARM host None (run it in process), after checking this CPU has the
    library's features: an illegal instruction would kill the process."""
    from graphopt.backends.tvm import aarch64

    if arm_host:
        missing = aarch64.missing_cpu_features(features)
        if missing:
            raise RuntimeError(
                f"{library} was built for {', '.join('+' + f for f in missing)} but this CPU "
                f"does not have {', '.join(missing)}"
            )
        return None

    def run_under_qemu(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        arrays = [a.detach().cpu().contiguous().numpy() for a in args]
        outputs = aarch64.run_library(library, arrays, require=features)
        return tuple(torch.from_numpy(o) for o in outputs)

    return run_under_qemu


def _plain(value: Any) -> Any:
    """TVM's target description (tvm containers inside) as plain JSON values."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or hasattr(value, "__len__"):
        return [_plain(v) for v in value]
    return str(value)
