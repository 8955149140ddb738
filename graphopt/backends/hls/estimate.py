"""FPGA resource and latency estimates of an HLS program, and the choice of reuse factors.

An analytical model of the kernels in kernels/graphopt_kernels.h, not a synthesis result: it
needs no vendor tools, and `ASSUMPTIONS` says what it takes for granted. Vitis HLS's csynth
report (build_prj.tcl) is the ground truth.

Reuse factor R of a MAC layer: each multiplier computes R products per output (per pixel for
a convolution), so a layer with P products per output uses P / R multipliers. R must divide
P and P / R must stay within Vitis's unroll limit (`MAX_MULTIPLIERS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from graphopt.backends.hls.kinds import kind_of
from graphopt.backends.hls.program import Layer, Program

MAX_MULTIPLIERS = 4096  # per layer: larger unrolls make Vitis HLS very slow (hls4ml's limit)
PRODUCTS_PER_DSP = 2  # two int8 x int8 products per DSP48E2 (Xilinx WP486 packing)
BRAM18_BITS, BRAM18_DEPTH_8BIT = 18 * 1024, 2048  # one BRAM18 as 2048 x 9
LUTRAM_BITS = 1024  # smaller arrays go to LUT RAM / registers
REQUANT_DSP = 4  # a 32 x 32 bit multiply per output stage
LAYER_CONTROL_LUT = 150

ASSUMPTIONS = [
    f"int8 x int8 products map to DSPs, {PRODUCTS_PER_DSP} per DSP48 (Xilinx WP486 packing)",
    "accumulation adds one accumulator-wide adder (LUTs = accumulator bits) per multiplier",
    f"each requantizing output stage uses {REQUANT_DSP} DSPs (a 32 x 32 bit multiply)",
    "weights are partitioned cyclically over the multipliers; a bank over "
    f"{LUTRAM_BITS} bits uses BRAM18s of 2048 x 8, smaller banks LUT RAM (64 bits per LUT)",
    f"activation buffers: BRAM18s of 2048 x 8 when over {LUTRAM_BITS} bits, else LUT RAM",
    "MAC layers: per output pixel, R pipelined cycles (II=1) plus one cycle per output "
    "channel plus a pipeline depth of 3 + log2(multipliers); other layers one element per "
    "cycle (pools: one window element per cycle)",
    "io='array': layers run one after another (interval = latency); io='stream': DATAFLOW "
    "overlaps samples (interval = the slowest layer)",
    "FFs = 2 x LUTs (pipeline registers)",
]

# Resources of common parts (Xilinx data sheets): DSP slices, BRAM18 blocks, LUTs, FFs.
PARTS: dict[str, dict[str, Any]] = {
    "xczu9eg-ffvb1156-2-e": {"board": "ZCU102", "dsp": 2520, "bram18": 1824, "lut": 274080},
    "xcu250-figd2104-2L-e": {"board": "Alveo U250", "dsp": 12288, "bram18": 5376, "lut": 1728000},
    "xcvu13p-flga2577-2-e": {"board": "VU13P", "dsp": 12288, "bram18": 5376, "lut": 1728000},
    "xc7z020clg400-1": {"board": "PYNQ-Z2", "dsp": 220, "bram18": 280, "lut": 53200},
}
DEFAULT_PART = "xczu9eg-ffvb1156-2-e"
DSP_SHARE = 0.8  # reuse="auto" without a budget: use at most this share of the part's DSPs


@dataclass(frozen=True)
class HLSOptions:
    """Options of `graphopt.export(..., format="hls", hls_options={...})`.

    Args:
        part: the FPGA part (Vitis name); utilization is reported for the parts in `PARTS`.
        clock_ns: the target clock period.
        io: "array" (memory interfaces, layers one after another) or "stream" (AXI streams,
            DATAFLOW between layers).
        reuse_factor: "auto", one int for every MAC layer, or {layer name: int} (others auto).
        max_dsp: with "auto", the DSP budget (default: 80% of the part's DSPs).
        target_latency_us: with "auto", the largest latency to accept; reuse factors are as
            large (few DSPs) as meets it. Takes precedence over max_dsp.
    """

    part: str = DEFAULT_PART
    clock_ns: float = 5.0
    io: str = "array"
    reuse_factor: Any = "auto"
    max_dsp: int | None = None
    target_latency_us: float | None = None

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> HLSOptions:
        options = dict(options or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"hls_options: unknown key(s) {unknown}; accepted keys: {sorted(known)}"
            )
        made = cls(**options)
        made.check()
        return made

    def check(self) -> None:
        if not isinstance(self.part, str) or not self.part:
            raise ValueError(f"hls_options part must be a part name, e.g. {DEFAULT_PART!r}")
        if (
            isinstance(self.clock_ns, bool)
            or not isinstance(self.clock_ns, int | float)
            or not (self.clock_ns > 0)
        ):
            raise ValueError(
                f"hls_options clock_ns must be a positive number, got {self.clock_ns!r}"
            )
        if self.io not in ("array", "stream"):
            raise ValueError(f"hls_options io {self.io!r}; accepted: 'array', 'stream'")
        rf = self.reuse_factor
        ok = (
            rf == "auto"
            or _positive_int(rf)
            or (
                isinstance(rf, dict)
                and all(isinstance(k, str) and _positive_int(v) for k, v in rf.items())
            )
        )
        if not ok:
            raise ValueError(
                f"hls_options reuse_factor must be 'auto', a positive int or "
                f"{{layer name: positive int}}, got {rf!r}"
            )
        if self.max_dsp is not None and not _positive_int(self.max_dsp):
            raise ValueError(f"hls_options max_dsp must be a positive int, got {self.max_dsp!r}")
        if self.target_latency_us is not None and (
            isinstance(self.target_latency_us, bool)
            or not isinstance(self.target_latency_us, int | float)
            or not self.target_latency_us > 0
        ):
            raise ValueError(
                f"hls_options target_latency_us must be a positive number, got "
                f"{self.target_latency_us!r}"
            )


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def products(layer: Layer) -> int:
    """Products per output (dense) or per output pixel (conv2d)."""
    return int(layer.tensors["weight"].numel())


def legal_reuse(layer: Layer) -> list[int]:
    """Reuse factors the layer can take, ascending (fastest first)."""
    p = products(layer)
    small = [r for r in range(1, math.isqrt(p) + 1) if p % r == 0]
    divisors = sorted(set(small + [p // r for r in small]))
    return [r for r in divisors if p // r <= MAX_MULTIPLIERS]


def _layer_estimate(layer: Layer, program: Program, reuse: int | None, acc_bits: int) -> dict:
    out = program.buffers[layer.output]
    est: dict[str, Any] = {"layer": layer.name, "kind": layer.kind, "source": layer.source}
    dsp = lut = bram = 0
    memory_bits = 0 if out.is_float else out.size * 8  # the output buffer
    if reuse is not None:
        p = products(layer)
        mult = p // reuse
        channels = int(layer.tensors["bias"].numel())
        depth = 3 + math.ceil(math.log2(mult + 1))
        cycles = kind_of(layer).pixels(layer) * (reuse + channels + depth)
        dsp = math.ceil(mult / PRODUCTS_PER_DSP) + REQUANT_DSP
        lut = mult * acc_bits + LAYER_CONTROL_LUT
        weight_bits = p * 8
        bank_depth = math.ceil(p / mult)
        if bank_depth * 8 > LUTRAM_BITS:
            bram += mult * math.ceil(bank_depth / BRAM18_DEPTH_8BIT)
        else:
            lut += mult * math.ceil(bank_depth * 8 / 64)
        memory_bits += weight_bits + channels * 64
        est.update(
            reuse_factor=reuse,
            multipliers=mult,
            macs=kind_of(layer).macs(layer),
            accumulator_bits=acc_bits,
        )
    else:
        n = out.size
        window = 1
        if kind_of(layer).window:
            window = layer.params["kernel"][0] * layer.params["kernel"][1]
        cycles = n * window + 3
        lut = LAYER_CONTROL_LUT
        dsp = REQUANT_DSP if kind_of(layer).rescales else 0
    if not out.is_float:
        if out.size * 8 > LUTRAM_BITS:
            bram += math.ceil(out.size / BRAM18_DEPTH_8BIT)
        else:
            lut += math.ceil(out.size * 8 / 64)
    est.update(cycles=cycles, dsp=dsp, lut=lut, ff=2 * lut, bram18=bram, memory_bits=memory_bits)
    return est


def estimate(
    program: Program, options: HLSOptions, reuse: dict[str, int], acc_bits: dict[str, int]
) -> dict[str, Any]:
    """Per layer and total: multipliers, DSP, LUT, FF, BRAM18, memory bits, cycles, latency."""
    layers = [
        _layer_estimate(layer, program, reuse.get(layer.name), acc_bits.get(layer.name, 32))
        for layer in program.layers
    ]
    total = {k: sum(e[k] for e in layers) for k in ("dsp", "lut", "ff", "bram18", "memory_bits")}
    total["multipliers"] = sum(e.get("multipliers", 0) for e in layers)
    cycles = sum(e["cycles"] for e in layers)
    interval = max(e["cycles"] for e in layers) if options.io == "stream" else cycles
    total.update(
        latency_cycles=cycles,
        latency_us=cycles * options.clock_ns / 1000,
        interval_cycles=interval,
        throughput_per_s=1e9 / (interval * options.clock_ns),
    )
    part = PARTS.get(options.part)
    utilization = None
    if part is not None:
        utilization = {
            "dsp_percent": 100 * total["dsp"] / part["dsp"],
            "bram18_percent": 100 * total["bram18"] / part["bram18"],
            "lut_percent": 100 * total["lut"] / part["lut"],
        }
    return {
        "part": options.part,
        "part_resources": part,
        "clock_ns": options.clock_ns,
        "io": options.io,
        "model": "analytical (graphopt.backends.hls.estimate), not a synthesis result",
        "assumptions": ASSUMPTIONS,
        "total": total,
        "utilization": utilization,
        "fits": None if utilization is None else all(v <= 100 for v in utilization.values()),
        "layers": layers,
    }


def choose_reuse(program: Program, options: HLSOptions, acc_bits: dict[str, int]) -> dict[str, int]:
    """A legal reuse factor per MAC layer: as given, or chosen to meet the latency target
    (fewest DSPs that meet it) or else the DSP budget (fastest that fits)."""
    macs = [layer for layer in program.layers if kind_of(layer).mac]
    legal = {layer.name: legal_reuse(layer) for layer in macs}
    given = options.reuse_factor
    fixed: dict[str, int] = {}
    if isinstance(given, dict):
        unknown = sorted(set(given) - set(legal))
        if unknown:
            raise ValueError(
                f"hls_options reuse_factor names unknown layer(s) {unknown}; MAC layers: "
                f"{sorted(legal)}"
            )
        fixed = dict(given)
    elif given != "auto":
        fixed = {name: given for name in legal}
    for name, r in fixed.items():
        if r not in legal[name]:
            nearby = sorted(legal[name], key=lambda v: abs(v - r))[:5]
            layer = next(layer for layer in macs if layer.name == name)
            raise ValueError(
                f"reuse factor {r} is not legal for layer {name} ({products(layer)} products per "
                f"output): it must divide them with at most {MAX_MULTIPLIERS} multipliers; "
                f"nearest legal values: {sorted(nearby)}"
            )
    free = [name for name in legal if name not in fixed]
    if not free:
        return fixed

    if options.target_latency_us is not None:
        reuse = {**fixed, **{name: legal[name][-1] for name in free}}  # fewest DSPs first
        return _step_until(
            program, options, acc_bits, reuse, legal, free,
            key="latency_us", limit=options.target_latency_us, step=-1, worst="cycles",
            failure=lambda best: f"target_latency_us={options.target_latency_us} cannot be met: "
            f"the fastest legal reuse factors give {best:.3g} us at {options.clock_ns} ns",
        )  # fmt: skip
    budget = options.max_dsp
    if budget is None:
        part = PARTS.get(options.part)
        budget = int(DSP_SHARE * part["dsp"]) if part is not None else None
    reuse = {**fixed, **{name: legal[name][0] for name in free}}  # fastest first
    if budget is None:
        return reuse
    return _step_until(
        program, options, acc_bits, reuse, legal, free,
        key="dsp", limit=budget, step=1, worst="dsp",
        failure=lambda used: f"the DSP budget {budget} cannot be met: the largest legal reuse "
        f"factors use {used} DSPs (raise max_dsp or choose a larger part)",
    )  # fmt: skip


def _step_until(
    program: Program,
    options: HLSOptions,
    acc_bits: dict[str, int],
    reuse: dict[str, int],
    legal: dict[str, list[int]],
    free: list[str],
    *,
    key: str,
    limit: float,
    step: int,
    worst: str,
    failure: Callable[[Any], str],
) -> dict[str, int]:
    """Move the free layer with the largest `worst` (cycles or DSPs) one legal reuse factor
    by `step` until the total `key` is within `limit`; ValueError(failure(total)) if no layer
    can move."""
    while True:
        result = estimate(program, options, reuse, acc_bits)
        if result["total"][key] <= limit:
            return reuse
        movable = [
            e
            for e in result["layers"]
            if e["layer"] in free
            and 0 <= legal[e["layer"]].index(reuse[e["layer"]]) + step < len(legal[e["layer"]])
        ]
        if not movable:
            raise ValueError(failure(result["total"][key]))
        name = max(movable, key=lambda e: e[worst])["layer"]
        reuse[name] = legal[name][legal[name].index(reuse[name]) + step]
