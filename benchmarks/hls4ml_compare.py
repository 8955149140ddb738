"""Accuracy of hls4ml 1.3.0's C emulation against graphopt's FPGA export on the digits models.

python -m benchmarks.hls4ml_compare                          # mlp and cnn, every config
python -m benchmarks.hls4ml_compare --models mlp --out-dir hls4ml_projects --out table.md

Needs hls4ml beside graphopt and g++, e.g. in a separate venv (the project's stays clean):
    pip install -c constraints.txt torch==2.13.0 numpy scikit-learn
    pip install hls4ml==1.3.0
    pip install -c constraints.txt -e .

Trains DigitsMLP and DigitsCNN (examples/int8_digits.py, initialisation seeded here too) and,
on the 500 held-out digits, measures top-1 of:
- the float model;
- hls4ml's C emulation (`hls_model.predict` after `compile`, io_parallel, Vitis backend) with
  its defaults (ap_fixed<16,6>, granularity="model", channels_last_conversion="full"), with
  channels_last_conversion="internal" (the input is fed as is: with one input channel NCHW and
  NHWC are the same bytes), and with granularity="name" (hls4ml's per-layer "auto" precision);
- graphopt's int8 `format="hls"` project, run by its g++ C simulation (`graphopt.load`).
Also the seconds of each build (hls4ml: convert + compile; graphopt: export, which builds and
checks the C simulation) and of each run on the 500 images, the largest |logit - float logit|,
and, from hls4ml's trace, each layer's float range against its fixed-point type: ap_fixed
defaults to AP_WRAP, so a float value outside the type's range wraps around.

hls4ml's PyTorch parser refuses grouped convolutions (the CNN's depthwise layer). That failure
is a row; the CNN is then converted with that layer rewritten as the equivalent dense
convolution (block-diagonal weights, identical float outputs), and its rows say so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import graphopt
from examples.int8_digits import BATCH, DigitsCNN, DigitsMLP, load_digits_split, train

MODELS = {"mlp": DigitsMLP, "cnn": DigitsCNN}
# name: (granularity, channels_last_conversion)
HLS4ML_CONFIGS: dict[str, tuple[str, str]] = {
    "default": ("model", "full"),
    "internal": ("model", "internal"),
    "name-auto": ("name", "internal"),
}


@dataclass
class Row:
    model: str
    tool: str
    top1: float | None = None
    build_s: float | None = None
    run_s: float | None = None
    max_diff: float | None = None
    note: str = ""
    layers: list[list[str]] = field(default_factory=list)  # the per-layer range check

    def cells(self) -> list[str]:
        def fmt(value: float | None, spec: str) -> str:
            return "" if value is None else format(value, spec)

        return [
            self.model,
            self.tool,
            fmt(self.top1, ".1f"),
            fmt(self.build_s, ".1f"),
            fmt(self.run_s, ".2f"),
            fmt(self.max_diff, ".3g"),
            self.note,
        ]


def top1(logits: np.ndarray | torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((np.asarray(logits).argmax(1) == labels.numpy()).mean())


def expand_grouped_convs(model: nn.Module) -> nn.Module:
    """A copy of `model` with each grouped Conv2d as a dense one with block-diagonal weights."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if not isinstance(conv, nn.Conv2d) or conv.groups == 1:
                continue
            dense = nn.Conv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, groups=1, bias=conv.bias is not None,
            )  # fmt: skip
            weight = torch.zeros_like(dense.weight)
            per_out, per_in = conv.out_channels // conv.groups, conv.in_channels // conv.groups
            for g in range(conv.groups):
                outs = slice(g * per_out, (g + 1) * per_out)
                weight[outs, g * per_in : (g + 1) * per_in] = conv.weight.detach()[outs]
            dense.weight.data = weight
            if conv.bias is not None:
                dense.bias.data = conv.bias.detach().clone()
            setattr(parent, name, dense)
    return model.eval()


def float_activations(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[str, np.ndarray]]:
    """Each leaf module's kind and output on `x`, in call order, keyed as hls4ml names layers
    ("net.1" -> "net_1"), channels last (as hls4ml's trace gives them)."""
    outputs: dict[str, tuple[str, np.ndarray]] = {}

    def recorder(key: str) -> Any:
        def hook(module: nn.Module, _args: Any, out: torch.Tensor) -> None:
            out = out.detach()
            out = out.permute(0, 2, 3, 1) if out.dim() == 4 else out
            outputs[key] = (type(module).__name__, out.numpy())

        return hook

    hooks = [
        module.register_forward_hook(recorder(name.replace(".", "_")))
        for name, module in model.named_modules()
        if name and not list(module.children())
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def fixed_max(precision: Any) -> float | None:
    """The largest value a fixed-point hls4ml type holds (None for other types)."""
    width, integer = getattr(precision, "width", None), getattr(precision, "integer", None)
    if width is None or integer is None:
        return None
    signed = getattr(precision, "signed", True)
    return 2.0 ** (integer - 1 if signed else integer) - 2.0 ** (integer - width)


def range_check(
    hls_model: Any, activations: dict[str, tuple[str, np.ndarray]], x: np.ndarray, log: Any
) -> list[list[str]]:
    """Per traced layer: its type, float max |output|, the type's max, how many float values
    lie outside it (those wrap), and the largest |hls4ml output - float output|."""
    with contextlib.redirect_stdout(log):
        _, trace = hls_model.trace(x)
    rows = []
    order = list(activations)
    for name, layer in hls_model.graph.items():
        if name not in trace or name not in activations:
            continue
        precision = layer.get_output_variable().type.precision
        limit = fixed_max(precision)
        reference, label = activations[name][1], name
        following = order[order.index(name) + 1 :][:1]
        if following and following[0] not in hls_model.graph:
            kind, output = activations[following[0]]
            if kind.startswith("BatchNorm"):  # folded into this layer by hls4ml
                reference, label = output, f"{name} (+{following[0]} folded)"
        traced = np.asarray(trace[name]).reshape(reference.shape)
        outside = "-" if limit is None else str(int((np.abs(reference) > limit).sum()))
        rows.append([
            label, type(layer).__name__.removeprefix("Vitis"), str(precision),
            f"{np.abs(reference).max():.2f}", "-" if limit is None else f"{limit:.4g}",
            outside, f"{np.abs(traced - reference).max():.3g}",
        ])  # fmt: skip
    return rows


def run_hls4ml(
    model: nn.Module, label: str, config_name: str, precision: str, data: Any, folder: Path,
    trace: bool,
) -> Row:  # fmt: skip
    """Convert, compile and predict with hls4ml under one of HLS4ML_CONFIGS."""
    import hls4ml

    x, y, float_logits = data
    granularity, channels_last = HLS4ML_CONFIGS[config_name]
    tool = f"hls4ml {precision}, granularity={granularity}, channels_last={channels_last}"
    row = Row(label, tool)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "hls4ml.log", "a") as log, contextlib.redirect_stdout(log):
        try:
            start = time.perf_counter()
            config = hls4ml.utils.config_from_pytorch_model(
                model, input_shape=tuple(x.shape[1:]), granularity=granularity, backend="Vitis",
                default_precision=precision, channels_last_conversion=channels_last,
            )  # fmt: skip
            if trace:  # only marks layers for hls_model.trace; predict is unchanged
                layer_config = config.setdefault("LayerName", {})
                for name, module in model.named_modules():
                    if name and not list(module.children()):
                        layer_config.setdefault(name.replace(".", "_"), {})["Trace"] = True
            hls_model = hls4ml.converters.convert_from_pytorch_model(
                model, hls_config=config, output_dir=str(folder), backend="Vitis",
                io_type="io_parallel",
            )  # fmt: skip
            hls_model.compile()
            row.build_s = time.perf_counter() - start
            start = time.perf_counter()
            logits = hls_model.predict(np.ascontiguousarray(x.numpy())).reshape(len(y), -1)
            row.run_s = time.perf_counter() - start
        except Exception as err:  # noqa: BLE001 - a row that says why
            return _failed(row, err)
    row.top1 = top1(logits, y)
    row.max_diff = float(np.abs(logits - float_logits).max())
    if trace:
        with open(folder / "hls4ml.log", "a") as log:
            row.layers = range_check(
                hls_model, float_activations(model, x), np.ascontiguousarray(x.numpy()), log
            )
        wraps = [r[0] for r in row.layers if r[5] not in ("-", "0")]
        row.note = "float values outside the type: " + (", ".join(wraps) if wraps else "none")
        # a layer whose error exceeds half its float range computes something else
        off = [r[0] for r in row.layers if float(r[6]) > 0.5 * float(r[3])]
        if off:
            row.note += f"; first layer far off the float model: {off[0]}"
    return row


def _failed(row: Row, err: Exception) -> Row:
    first = (str(err).strip().splitlines() or [""])[0][:200]
    row.note = f"failed: {type(err).__name__}: {first}"
    return row


def run_graphopt(model: nn.Module, label: str, data: Any, calibration: list, folder: Path) -> Row:
    x, y, float_logits = data
    row = Row(label, "graphopt int8, format=hls (g++ csim)")
    start = time.perf_counter()
    try:
        exported = graphopt.export(
            model, (x[:8],), folder, format="hls", quantize="int8", calibration=calibration,
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, overwrite=True, progress=False,
        )  # fmt: skip
        row.build_s = time.perf_counter() - start
        start = time.perf_counter()
        logits = graphopt.load(exported.path)(x)
        row.run_s = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - a row that says why
        return _failed(row, err)
    row.top1 = top1(logits, y)
    row.max_diff = float((logits - float_logits).abs().max())
    row.note = "int8, saturating; run includes the g++ build of the testbench"
    return row


def compare(name: str, args: argparse.Namespace, out_dir: Path) -> list[Row]:
    train_data, (x, y) = load_digits_split()
    torch.manual_seed(0)  # train() seeds after the model is built: seed its initialisation too
    model = train(MODELS[name](), train_data)
    with torch.no_grad():
        float_logits = model(x)
    data = (x, y, float_logits.numpy())
    rows = [Row(name, "PyTorch float32", top1(float_logits, y), note="reference")]
    print(f"{name}: float top-1 {rows[0].top1:.1f}%", flush=True)

    hls_model, label = model, name
    for config_name in args.configs.split(","):
        folder = out_dir / f"hls4ml-{name}-{config_name}"
        row = run_hls4ml(hls_model, label, config_name, args.precision, data, folder, args.trace)
        if "Non-default options for groups" in row.note and hls_model is model:
            rows.append(row)  # the refusal itself, then the equivalent dense-conv model
            print(f"{name}: {row.note}", flush=True)
            hls_model, label = expand_grouped_convs(model), f"{name} (depthwise as dense conv)"
            with torch.no_grad():
                assert torch.allclose(hls_model(x), float_logits, atol=1e-5)
            row = run_hls4ml(
                hls_model, label, config_name, args.precision, data, folder, args.trace
            )
        rows.append(row)
        print(" | ".join(row.cells()), flush=True)

    calibration = [(train_data[0][i : i + BATCH],) for i in range(0, 4 * BATCH, BATCH)]
    rows.append(run_graphopt(model, name, data, calibration, out_dir / f"graphopt-{name}"))
    print(" | ".join(rows[-1].cells()), flush=True)
    return rows


def markdown(rows: list[Row]) -> str:
    header = [
        "model", "tool / config", "top-1 %", "build s", "run s (500)",
        "max abs logit diff vs float", "notes",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    traced = [row for row in rows if row.layers]
    if traced:
        lines += [
            "",
            "hls4ml trace against the float model, per layer (outside: float values beyond the "
            "type's range, which AP_WRAP wraps; diff: max |hls4ml - float| over the 500 images):",
            "",
            "| model | config | layer | kind | type | float max abs | type max | outside | diff |",
            "|---|---|---|---|---|---:|---:|---:|---:|",
        ]
        for row in traced:
            config = row.tool.removeprefix("hls4ml ")
            lines += [f"| {row.model} | {config} | " + " | ".join(r) + " |" for r in row.layers]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn", help=f"from {list(MODELS)}")
    parser.add_argument(
        "--configs", default=",".join(HLS4ML_CONFIGS), help=f"from {list(HLS4ML_CONFIGS)}"
    )
    parser.add_argument("--precision", default="ap_fixed<16,6>", help="hls4ml default_precision")
    parser.add_argument(
        "--no-trace", dest="trace", action="store_false", help="skip the per-layer range check"
    )
    parser.add_argument(
        "--out-dir", help="where the projects are written (default: a new temporary folder)"
    )
    parser.add_argument("--out", help="also write the markdown to this file")
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; accepted: {list(MODELS)}")
    for name in args.configs.split(","):
        if name not in HLS4ML_CONFIGS:
            parser.error(f"unknown config {name!r}; accepted: {list(HLS4ML_CONFIGS)}")
    import hls4ml  # fail early, with the install hint of the docstring

    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="hls4ml-compare-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for name in args.models.split(",") for row in compare(name, args, out_dir)]
    command = "python -m benchmarks.hls4ml_compare " + " ".join(argv or sys.argv[1:])
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    text = "\n".join([
        "# hls4ml vs graphopt FPGA export: top-1 on 500 held-out digits",
        "",
        f"- command: `{command.strip()}`",
        f"- python {platform.python_version()}, torch {torch.__version__}, hls4ml "
        f"{hls4ml.__version__}, numpy {np.__version__}; load average at the end: {load}",
        "- hls4ml: Vitis backend, io_parallel, Strategy Latency, ReuseFactor 1; C emulation "
        "with g++ (`hls_model.predict`); graphopt: int8 calibrated on 4 x 100 training images",
        "",
        markdown(rows),
    ])  # fmt: skip
    print()
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
