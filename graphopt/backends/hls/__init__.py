"""target="hls": FPGA C++ (Vitis-HLS style) from int8 graphs, C-simulated with g++.

program.py    the quantized ATen graph -> an integer layer program
reference.py  graphopt's int8 reference: the program run exactly in PyTorch
project.py    the C++ project (firmware, testbench, Makefile, build_prj.tcl) and csim
estimate.py   analytical resources/latency, reuse factors
kernels/      the C++ kernel library
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx

from graphopt.backends.hls.estimate import HLSOptions, choose_reuse, estimate
from graphopt.backends.hls.program import (
    SUPPORTED,
    Program,
    accumulator_bits,
    accumulator_widths,
    build_program,
    unsupported_reason,
)
from graphopt.backends.hls.project import (
    ProjectOptions,
    build_csim,
    compiler_version,
    csim_runner,
    missing_compiler,
    run_csim,
    temporary_build_dir,
    write_project,
    write_samples,
)
from graphopt.backends.hls.reference import run_program
from graphopt.backends.registry import OpRegistry

# The capability list: the ops `build_program` turns into integer layers. Partitioning asks
# it; the lowering of a partition is the whole program (`target.HLSBackend.compile`), not
# per-node rules.
HLS = OpRegistry("hls")
HLS.rule(*SUPPORTED, check=lambda node, cfg: unsupported_reason(node, cfg))(build_program)

__all__ = [
    "HLS",
    "HLSOptions",
    "HLSProject",
    "build_csim",
    "build_program",
    "compiler_version",
    "csim_runner",
    "missing_compiler",
    "run_csim",
    "run_program",
    "temporary_build_dir",
    "write_hls_project",
]


@dataclass
class HLSProject:
    """What `write_hls_project` wrote and measured."""

    program: Program
    options: HLSOptions
    reuse: dict[str, int]
    estimates: dict[str, Any]
    config: dict[str, Any]


def _accumulators(program: Program, calibration: Sequence[Sequence[torch.Tensor]]) -> dict:
    """Per MAC layer: worst-case bits and the bits the calibration data needed."""
    observed: dict[str, int] = {}
    for batch in calibration:
        run_program(program, list(batch), accumulators=observed)
    return {
        layer.name: {
            "bits": accumulator_bits(layer),
            "worst_case_bound": int(layer.params["acc_bound"]),
            "calibration_max_abs": observed.get(layer.name, 0),
            "calibration_bits": observed.get(layer.name, 0).bit_length() + 1,
            "headroom_bits": accumulator_bits(layer)
            - (observed.get(layer.name, 0).bit_length() + 1),
        }
        for layer in program.layers
        if "acc_bound" in layer.params
    }


def write_hls_project(
    gm: torch.fx.GraphModule,
    folder: Path,
    options: HLSOptions,
    calibration: Sequence[Sequence[torch.Tensor]],
    example_inputs: Sequence[torch.Tensor],
) -> HLSProject:
    """Write the project for a graph quantized with target="hls" into `folder` (existing):
    the C++ files, config.json, estimates.json, and tb_input.txt / tb_output.txt (the
    example inputs and graphopt's int8 reference outputs, for the testbench)."""
    program = build_program(gm)
    accumulators = _accumulators(program, calibration)
    acc_bits = accumulator_widths(program)
    reuse = choose_reuse(program, options, acc_bits)
    estimates = estimate(program, options, reuse, acc_bits)
    for entry in estimates["layers"]:
        if entry["layer"] in accumulators:
            entry["accumulator"] = accumulators[entry["layer"]]
    project = ProjectOptions(options.part, float(options.clock_ns), options.io, reuse)
    write_project(program, folder, project)
    config = program_config(program, options, reuse, accumulators)
    batch = example_inputs[0].shape[0]
    rows = torch.cat([x.reshape(batch, -1) for x in example_inputs], 1).tolist()
    write_samples(folder / "tb_input.txt", rows)
    outs = run_program(program, list(example_inputs))
    write_samples(
        folder / "tb_output.txt", torch.cat([o.reshape(batch, -1) for o in outs], 1).tolist()
    )
    return HLSProject(program, options, reuse, estimates, config)


def program_config(
    program: Program, options: HLSOptions, reuse: dict[str, int], accumulators: dict
) -> dict[str, Any]:
    """config.json: the project as plain data (no tensors, nothing pickled)."""
    layers = []
    for layer in program.layers:
        entry: dict[str, Any] = {
            "name": layer.name,
            "kind": layer.kind,
            "source": layer.source,
            "inputs": layer.inputs,
            "output": layer.output,
            "params": {
                k: v for k, v in layer.params.items() if k not in ("acc_bound", "float_activation")
            },
        }
        if layer.name in reuse:
            entry["reuse_factor"] = reuse[layer.name]
        if layer.name in accumulators:
            entry["accumulator"] = accumulators[layer.name]
        layers.append(entry)
    return {
        "top": "graphopt_top",
        "part": options.part,
        "clock_ns": options.clock_ns,
        "io": options.io,
        "activations": "uint8 [0, 255], per-tensor zero point",
        "weights": "int8 [-127, 127], per output channel",
        "buffers": {
            name: {
                "shape": list(b.shape),
                "dtype": "float32" if b.is_float else "uint8",
                "scale": b.scale,
                "zero_point": None if b.is_float else b.zero_point,
            }
            for name, b in program.buffers.items()
        },
        "inputs": program.inputs,
        "outputs": program.outputs,
        "layers": layers,
    }
