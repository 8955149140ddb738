"""target "hls": FPGA C++ (Vitis-HLS style) as a graphopt `Backend`. Under torch.compile and
optimize the project is written to a temporary folder and its C simulation runs the graph;
artifacts are the project (firmware/, testbench, Makefile, build_prj.tcl, config.json,
estimates.json), checked bit for bit against graphopt's int8 reference when written."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from graphopt.backends.base import Backend, Compiled, ExportJob
from graphopt.backends.hls import (
    HLS,
    HLSOptions,
    ProjectOptions,
    accumulator_widths,
    build_csim,
    build_program,
    choose_reuse,
    compiler_version,
    csim_runner,
    missing_compiler,
    run_csim,
    run_program,
    temporary_build_dir,
    write_hls_project,
    write_project,
)
from graphopt.config import Config
from graphopt.errors import VerificationError
from graphopt.files import write_json

log = logging.getLogger("graphopt")


class HLSBackend(Backend):
    label = "hls-csim"
    registry = HLS
    model_file = "firmware/model.cpp"

    def compile(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        cfg: Config,
        *,
        training: bool = False,
        backward: bool = False,
    ) -> Compiled:
        """Write the project to a temporary folder, build its C simulation, and run the graph
        with it (the FPGA's numbers)."""
        problem = missing_compiler()
        if problem is not None:
            raise RuntimeError(problem)
        if not any(
            n.target is torch.ops.quantized_decomposed.quantize_per_tensor.default
            for n in gm.graph.nodes
            if n.op == "call_function"
        ):
            raise RuntimeError("target='hls' computes int8: compile with quantize='int8'")
        program = build_program(gm)
        folder = temporary_build_dir("graphopt-hls-")
        options = HLSOptions()
        reuse = choose_reuse(program, options, accumulator_widths(program))
        write_project(
            program, folder, ProjectOptions(options.part, options.clock_ns, options.io, reuse)
        )
        start = time.perf_counter()
        shapes = [program.buffers[name].shape for name in program.outputs]
        run = csim_runner(folder, shapes, folder)
        log.info(
            "graphopt hls: C simulation of %s built in %.1fs", folder, time.perf_counter() - start
        )
        return Compiled(run, note=f"C simulation of the project in {folder}")

    def export_options(self, cfg: Config, options: Any) -> HLSOptions:
        return HLSOptions.from_dict(options)

    def check_export(self, gm: torch.fx.GraphModule, cfg: Config) -> None:
        build_program(gm)  # every node it cannot express, at once, before anything is written

    def write(self, job: ExportJob, folder: Path) -> dict[str, Any]:
        """The HLS project, its estimates, and its C simulation checked bit for bit against
        graphopt's int8 reference on the example inputs and every calibration batch."""
        options, say = job.options, job.say
        inputs, batches = job.example_inputs, job.calibration
        if any(x.dim() == 0 for x in inputs):
            raise ValueError("format='hls' needs a batch dim (dim 0) on every input")
        say(
            f"writing the HLS project (part {options.part}, {options.clock_ns} ns, io={options.io})"
        )
        project = write_hls_project(job.gm, folder, options, batches, inputs)
        write_json(folder / "estimates.json", project.estimates)
        write_json(folder / "config.json", project.config)
        total = project.estimates["total"]
        say(
            f"estimates: {total['dsp']} DSP, {total['bram18']} BRAM18, {total['lut']} LUT, "
            f"latency {total['latency_us']:.3g} us at {options.clock_ns} ns"
        )
        hls: dict[str, Any] = {
            "part": options.part,
            "clock_ns": options.clock_ns,
            "io": options.io,
            "reuse_factors": project.reuse,
            "estimates": total,
        }
        problem = missing_compiler()
        if problem is not None:
            hls["csim"] = f"not run: {problem}"
            say(hls["csim"])
            return {"hls": hls}
        with tempfile.TemporaryDirectory(prefix="graphopt-csim-") as tmp:
            start = time.perf_counter()
            binary = build_csim(folder, Path(tmp) / "csim")
            built = time.perf_counter() - start
            shapes = [project.program.buffers[n].shape for n in project.program.outputs]
            samples = worst = 0
            start = time.perf_counter()
            for batch in [inputs, *batches]:
                got = run_csim(binary, list(batch), shapes)
                want = run_program(project.program, list(batch))
                samples += batch[0].shape[0]
                for g, w in zip(got, want):
                    worst = max(worst, float((g - w).abs().max()) if g.numel() else 0.0)
                    if not torch.equal(g, w):
                        raise VerificationError(
                            "hls C simulation",
                            f"differs from graphopt's int8 reference by up to {worst:.3g} "
                            "(it must be bit-exact)",
                        )
            ran = time.perf_counter() - start
        hls["csim"] = {
            "compiler": compiler_version(),
            "samples": samples,
            "max_abs_difference_vs_int8_reference": worst,
            "build_seconds": round(built, 2),
            "run_seconds": round(ran, 3),
        }
        say(f"C simulation: {samples} samples bit-exact with graphopt's int8 reference")
        return {"hls": hls}

    def where_artifact_runs(self, cfg: Config) -> str | dict[str, Any]:
        problem = missing_compiler()
        if problem is not None:
            return {"ran": False, "reason": problem}
        return "in C simulation (g++)"

    def load(self, folder: Path, manifest: dict[str, Any]) -> Callable[..., Any]:
        """Build the project's C simulation (in a temporary folder) and run it."""
        shapes = [tuple(spec["shape"][1:]) for spec in manifest["outputs"]]
        return csim_runner(folder, shapes, temporary_build_dir("graphopt-csim-"))
