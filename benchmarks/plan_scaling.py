"""The planner at scale: `python -m benchmarks.plan_scaling` writes
benchmarks/RESULTS-plan-scaling.md and benchmarks/RESULTS-plan-scaling.svg.

graphopt.plan's model of data-parallel training (docs/plan.md), simulated for 8 to 1,024
GPUs, against published scaling results of ring all-reduce data parallelism (the algorithm of
PyTorch's DistributedDataParallel):

- Horovod (Sergeev and Del Balso, "Horovod: fast and easy distributed deep learning in
  TensorFlow", arXiv:1802.05799; the numbers as its README and docs/benchmarks state them):
  tf_cnn_benchmarks, batch 64 per GPU, servers of 4 Pascal GPUs on a 25 Gbit/s RoCE network.
  Scaling efficiency (throughput over GPUs x one GPU's): 90% for Inception V3 and ResNet-101
  and 79% for VGG-16 on 32 servers (128 GPUs, README of early 2018); 90%, 90% and 68% on 128
  servers (512 GPUs).
- Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
  arXiv:1706.02677: ResNet-50, 32 images per GPU (8,192 on 256), servers of 8 P100 GPUs with
  NVLink on 50 Gbit/s Ethernet: "~90% scaling efficiency when moving from 8 to 256 GPUs".

The models' sizes are torchvision's published figures (parameters; multiply-accumulates of a
forward at 224x224, 299x299 for Inception V3); a training step is 3 forwards' FLOPs. One
assumption sets every GPU's speed: 103.6 images/s of ResNet-101 (Horovod's example output, 1,656.82
images/s on 16 GPUs), i.e. 4.85 TFLOP/s on training steps, for every model. The network is
the papers' (25 and 50 Gbit/s between servers; within a server 10 GB/s PCIe and 20 GB/s
NVLink), 10 microseconds a ring step, Horovod's 64 MB fusion buffer and DDP's 25 MB buckets.
Nothing is fitted to the published efficiencies. Each model is drawn twice: without overlap (the
all-reduce after the backward: the planner's upper bound of the step) and with it (behind the
backward but for the last bucket); the published points fall between the two, or the file
says where they do not.

    python -m benchmarks.plan_scaling
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.chart import line_svg  # noqa: E402
from graphopt.plan import DeviceKind, Workload, layouts_for  # noqa: E402

HERE = Path(__file__).resolve().parent
GPUS = (1, 8, 16, 32, 64, 128, 256, 512, 1024)
# torchvision's model table (docs.pytorch.org/vision/stable/models.html): parameters and
# GMACs of one forward (its "GFLOPS" column counts multiply-accumulates).
MODELS = {
    "ResNet-50": (25.557e6, 4.09),
    "ResNet-101": (44.549e6, 7.80),
    "Inception V3": (23.834e6, 5.71),  # without the auxiliary head (tf_cnn_benchmarks' model)
    "VGG-16": (138.358e6, 15.47),
}
GPU_FLOPS = 103.6 * 6 * 7.80e9  # ResNet-101 images/s x training FLOPs per image


@dataclass(frozen=True)
class Published:
    model: str
    cluster: str
    gpus: int
    efficiency: float
    base: int  # the GPU count the efficiency is relative to
    source: str


PUBLISHED = [
    Published("Inception V3", "horovod", 128, 0.90, 1, "Horovod README (2018), 32 servers"),
    Published("ResNet-101", "horovod", 128, 0.90, 1, "Horovod README (2018), 32 servers"),
    Published("VGG-16", "horovod", 128, 0.79, 1, "Horovod README (2018), 32 servers"),
    Published("Inception V3", "horovod", 512, 0.90, 1, "Horovod docs/benchmarks, 128 servers"),
    Published("ResNet-101", "horovod", 512, 0.90, 1, "Horovod docs/benchmarks, 128 servers"),
    Published("VGG-16", "horovod", 512, 0.68, 1, "Horovod docs/benchmarks, 128 servers"),
    Published("ResNet-50", "goyal", 256, 0.90, 8, "Goyal et al. 2017, arXiv:1706.02677"),
]
CLUSTERS = {
    # name: (device, batch per GPU, bucket bytes)
    "horovod": (
        DeviceKind("p100, 4 a server, 25 Gbit/s", GPU_FLOPS, 16e9, 10e9, count=1024,
                   per_node=4, node_link_bytes_per_s=25e9 / 8, latency_s=10e-6),
        64,
        64e6,
    ),
    "goyal": (
        DeviceKind("p100, 8 a server, 50 Gbit/s", GPU_FLOPS, 16e9, 20e9, count=1024,
                   per_node=8, node_link_bytes_per_s=50e9 / 8, latency_s=10e-6),
        32,
        25e6,
    ),
}  # fmt: skip
CLUSTER_OF = {"ResNet-50": "goyal"}  # the others are Horovod's


def efficiency(model: str, overlap: bool) -> dict[int, float]:
    """{GPUs: samples/s over GPUs x one GPU's samples/s} predicted by graphopt.plan."""
    params, macs = MODELS[model]
    device, batch, bucket = CLUSTERS[CLUSTER_OF.get(model, "horovod")]
    device = replace(device, overlap=overlap)
    forward = 2 * macs * 1e9 * batch
    work = Workload(3 * forward, int(params * 4), batch, forward)
    by = {x.replicas: x for x in layouts_for(work, device, bucket_bytes=bucket) if x.stages == 1}
    one = by[1].samples_per_s
    return {n: by[n].samples_per_s / (n * one) for n in GPUS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-plan-scaling.md")
    args = parser.parse_args(argv)
    curves = {(m, o): efficiency(m, o) for m in MODELS for o in (False, True)}
    rows = [
        "| model | published | GPUs | published efficiency | predicted, no overlap "
        "| predicted, overlap | published within |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for p in PUBLISHED:
        low, high = (curves[p.model, o][p.gpus] / curves[p.model, o][p.base] for o in (False, True))
        inside = (
            "the two"
            if low - 0.02 <= p.efficiency <= high + 0.02
            else (f"no: {p.efficiency - low:+.0%} from no overlap")
        )
        base = f" (vs {p.base})" if p.base != 1 else ""
        rows.append(
            f"| {p.model} | {p.source} | {p.gpus}{base} | {p.efficiency:.0%} | {low:.0%} "
            f"| {high:.0%} | {inside} |"
        )
    curve_rows = [
        "| model | overlap | " + " | ".join(str(n) for n in GPUS[1:]) + " |",
        "|---|---|" + "---:|" * (len(GPUS) - 1),
    ]
    for (model, overlap), values in curves.items():
        curve_rows.append(
            f"| {model} | {'yes' if overlap else 'no'} | "
            + " | ".join(f"{values[n]:.0%}" for n in GPUS[1:])
            + " |"
        )
    colors = dict(zip(MODELS, ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1"), strict=True))
    lines, dashed, line_colors = {}, set(), {}
    for (model, overlap), values in curves.items():
        label = f"{model} {'overlap' if overlap else 'no overlap'}"
        lines[label] = [(n, values[n]) for n in GPUS[1:]]
        line_colors[label] = colors[model]
        if not overlap:
            dashed.add(label)
    points: dict[str, list[tuple[float, float]]] = {}
    for p in PUBLISHED:
        if p.base == 1:
            points.setdefault(f"{p.model} published", []).append((p.gpus, p.efficiency))
    svg = line_svg(
        "graphopt.plan: data-parallel scaling efficiency, simulated",
        lines,
        x_label="GPUs",
        y_label="scaling efficiency",
        points=points,
        dashed=frozenset(dashed),
        colors=line_colors,
        y_range=(0.4, 1.0),
        note="squares: published (Horovod). Command: python -m benchmarks.plan_scaling",
    )
    svg_path = args.out.with_suffix(".svg")
    svg_path.write_text(svg)
    text = "\n".join([
        "# The planner at scale: simulated data-parallel scaling against published results "
        "(`benchmarks/plan_scaling.py`)",
        "",
        "Command: `python -m benchmarks.plan_scaling`  ",
        f"Date: {datetime.date.today()} (a simulation: nothing is timed here)",
        "",
        "graphopt.plan's model (docs/plan.md) of ring all-reduce data parallelism on the "
        "clusters of two published results; the models' sizes are torchvision's, every GPU "
        f"runs training steps at {GPU_FLOPS / 1e12:.2f} TFLOP/s (103.6 images/s of "
        "ResNet-101: Horovod's example output), 10 us a ring step; the module's docstring "
        "gives the sources. Scaling efficiency: samples/s over GPUs x one GPU's "
        "(Goyal et al.: over 8 GPUs').",
        "",
        "## Published against predicted",
        "",
        *rows,
        "",
        f"![scaling]({svg_path.name})",
        "",
        "## The simulated curves",
        "",
        *curve_rows,
        "",
    ])  # fmt: skip
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
