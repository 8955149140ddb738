"""The `graphopt` command: `graphopt bench ...`, `graphopt tune ...`, `graphopt export ...`,
`graphopt run ...`, `graphopt ops ...`, `graphopt plan ...`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from graphopt import targets
from graphopt.errors import VerificationError


def _load_factory(spec: str):
    """'path/to/file.py:make_model' or 'package.module:make_model' -> the callable."""
    if ":" not in spec:
        raise SystemExit(
            f"graphopt: model must look like 'file.py:factory' or 'module:factory', got {spec!r}"
        )
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise SystemExit(f"graphopt: no such file {where!r}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module  # dynamo's guards import the model's module by name
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    try:
        return getattr(module, name)
    except AttributeError:
        raise SystemExit(f"graphopt: {where!r} has no attribute {name!r}") from None


def _parse_option(text: str) -> tuple[str, Any]:
    import ast

    if "=" not in text:
        raise SystemExit(f"graphopt: options look like key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must be comma-separated ints, got {text!r}"
        ) from None


def _random_calibration(shapes: list[tuple[int, ...]]) -> list[tuple[Any, ...]]:
    """4 batches of random inputs of `shapes` for int8 calibration (announced: speed only)."""
    import torch

    print("int8: calibrating on 4 random batches (fine for speed, not for accuracy)")
    return [tuple(torch.randn(*shape) for shape in shapes) for _ in range(4)]


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    import graphopt
    from graphopt.bench import StolenTime, compare_speed, format_timings

    options = dict(_parse_option(o) for o in args.option)
    options.setdefault("target", args.target)
    graphopt.Config.from_options(options)  # fail on a bad option before building anything
    model = _load_factory(args.model)().eval()
    inputs = tuple(torch.randn(*shape) for shape in args.input)
    quantized = options.get("quantize") is not None
    if quantized and "calibration" not in options:
        options["calibration"] = _random_calibration(args.input)
    compiled = torch.compile(model, backend="graphopt", options=options)
    shown = {k: v for k, v in options.items() if k != "calibration"}
    print(f"compiling {args.model} with graphopt {shown} ...", flush=True)
    with torch.no_grad():
        expected, got = model(*inputs), compiled(*inputs)
    for report in graphopt.reports():
        print(report)
    if quantized:  # lossy: say how far, do not pretend it matches
        errors = [
            graphopt.testing.relative_error(e, g)
            for e, g in zip(
                torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)
            )
            if isinstance(e, torch.Tensor) and e.is_floating_point()
        ]
        print(f"int8 relative output error vs eager: {max(errors, default=0.0):.3%}")
    else:
        graphopt.testing.assert_same_outputs(expected, got)
        print("outputs match eager")
    with StolenTime() as stolen:
        timings = compare_speed({"eager": model, "graphopt": compiled}, inputs, rounds=args.rounds)
    print(format_timings(timings))
    if stolen.suspect:
        print(f"note: {stolen.warning()}")
    return 0


_DEVICE_OPTIONS = {
    "per_node": int,
    "node_link_bytes_per_s": float,
    "latency_s": float,
    "overlap": lambda v: _flag("overlap", v),
}


def _flag(key: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(f"{key} must be 0 or 1, got {value!r}")
    return value == "1"


def _device(text: str) -> Any:
    """'name,flops_per_s,memory_bytes,link_bytes_per_s,price_per_hour,count[,key=value...]'
    -> DeviceKind (keys: per_node, node_link_bytes_per_s, latency_s, overlap=0|1)."""
    from graphopt.plan import DeviceKind

    parts = text.split(",")
    extra = [p for p in parts[6:] if "=" in p]
    if len(parts) < 6 or len(extra) != len(parts) - 6:
        raise argparse.ArgumentTypeError(
            "a device is 'name,flops_per_s,memory_bytes,link_bytes_per_s,price_per_hour,count' "
            f"and optionally ',{'=...,'.join(_DEVICE_OPTIONS)}=...' "
            f"(e.g. a100,150e12,80e9,100e9,2.0,8 or "
            f"a100,150e12,80e9,100e9,2.0,64,per_node=8,node_link_bytes_per_s=25e9,overlap=1), "
            f"got {text!r}"
        )
    try:
        numbers = [float(v) for v in parts[1:5]]
        options = {}
        for item in extra:
            key, _, value = item.partition("=")
            if key not in _DEVICE_OPTIONS:
                raise ValueError(f"unknown key {key!r}; keys: {', '.join(_DEVICE_OPTIONS)}")
            options[key] = _DEVICE_OPTIONS[key](value)
        return DeviceKind(parts[0], *numbers, count=int(parts[5]), **options)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"device {text!r}: {err}") from None


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from graphopt.plan import plan

    if args.option:
        raise ValueError("graphopt plan takes no --option (it plans eager training steps)")
    model = _load_factory(args.model)().train()
    inputs = tuple(torch.randn(*shape) for shape in args.input)
    print(f"planning training of {args.model} (batch {args.input[0][0]} per replica)", flush=True)
    result = plan(model, inputs, devices=args.device or None, goal_samples_per_s=args.goal)
    print(result)
    if result.best is None:
        print("no layout fits and meets the goal")
        return 1
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import torch

    import graphopt
    from graphopt.bench import compare_speed, format_timings

    options = dict(_parse_option(o) for o in args.option)
    model = _load_factory(args.model)().eval()
    inputs = tuple(torch.randn(*shape) for shape in args.input)
    print(f"tuning {args.model} for target='llvm' on this machine, budget {args.budget:g}s")
    with torch.no_grad():
        result = graphopt.tune(
            model, inputs, budget_s=args.budget, max_trials=args.max_trials, **options
        )
        print(result)
        if args.rounds:
            tuned = graphopt.optimize(model, inputs, target="llvm", **options)
            graphopt.testing.assert_same_outputs(model(*inputs), tuned(*inputs))
            print("tuned outputs match eager")
            runners = {"eager": model, "graphopt-llvm-tuned": tuned}
            print(format_timings(compare_speed(runners, inputs, rounds=args.rounds)))
    return 0


def _budget(text: str) -> float:
    """'1200', '1200s', '20m' or '1h' -> seconds."""
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:].lower())
    try:
        seconds = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"budget must be like 600, 600s, 20m or 1h, got {text!r}")
    return seconds


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    import graphopt

    options = dict(_parse_option(o) for o in args.option)
    if args.target is not None:
        options["target"] = args.target
    model = _load_factory(args.model)().eval()
    inputs = tuple(torch.randn(*shape) for shape in args.input)
    if args.calibration == "random":
        options["calibration"] = _random_calibration(args.input)
    elif args.calibration is not None:
        options["calibration"] = list(_load_factory(args.calibration)())
    if args.hls_option:
        options["hls_options"] = dict(_parse_option(o) for o in args.hls_option)
    if args.platforms is not None:
        options["platforms"] = [p.strip() for p in args.platforms.split(",") if p.strip()]
    exported = graphopt.export(
        model, inputs, args.out_dir, format=args.format, overwrite=args.overwrite, **options
    )
    print(exported.report)
    hls = exported.manifest.get("hls")
    if hls is not None:
        total = hls["estimates"]
        print(
            f"FPGA estimates ({hls['part']}, {hls['clock_ns']} ns): {total['dsp']} DSP, "
            f"{total['bram18']} BRAM18, {total['lut']} LUT, latency {total['latency_us']:.3g} us "
            f"(estimates.json)"
        )
        csim = hls["csim"]
        if isinstance(csim, dict):
            print(f"C simulation: {csim['samples']} samples bit-exact with the int8 reference")
        else:
            print(f"C simulation {csim}")
    verification = exported.manifest["verification"]
    if verification.get("ran"):
        print(
            f"ran {verification['ran']}: max abs error {verification['max_abs_error_vs_graph']:.3g}"
            f" vs graphopt's graph, {verification['max_abs_error_vs_eager']:.3g} vs eager"
        )
    else:
        print(f"not run here: {verification['reason']}")
    print(f"artifact: {exported.path} (load it with graphopt.load({str(exported.path)!r}))")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    import graphopt
    from graphopt.bench import compare_speed, format_timings

    artifact = graphopt.load(args.artifact)
    sizes = dict(_parse_option(d) for d in args.dim)
    inputs = []
    for spec in artifact.manifest["inputs"]:
        shape = []
        for d in spec["shape"]:
            if isinstance(d, str) and d not in sizes:
                raise ValueError(f"input {spec['name']!r} has dynamic dim {d}: give --dim {d}=N")
            shape.append(sizes[d] if isinstance(d, str) else d)
        dtype = getattr(torch, spec["dtype"])
        inputs.append(
            torch.randn(shape).to(dtype)
            if dtype.is_floating_point
            else torch.zeros(shape, dtype=dtype)
        )
    print(f"{artifact}: inputs {[tuple(x.shape) for x in inputs]}")
    outputs = artifact.run_flat(inputs)
    print(f"outputs {[(tuple(o.shape), str(o.dtype)) for o in outputs]}")
    print(
        format_timings(
            compare_speed({"artifact": artifact.run_flat}, (inputs,), rounds=args.rounds)
        )
    )
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    from graphopt import targets

    backend = targets.backend(args.target)
    if backend.registry.supports_all:
        print(
            f"target={args.target!r} ({backend.label}) takes the whole graph (a graph it "
            "fails to compile runs in PyTorch, named in the report)"
        )
        return 0
    ops = backend.registry.ops()
    print(f"target={args.target!r} ({backend.label}): {len(ops)} ops with lowering rules")
    for op in ops:
        print(f"  {op}")
    return 0


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="'file.py:factory' or 'module:factory' returning an nn.Module"
    )
    parser.add_argument(
        "--input",
        type=_shape,
        action="append",
        required=True,
        help="input shape, e.g. 1,3,224,224 (repeat for several inputs)",
    )
    parser.add_argument("--option", action="append", default=[], help="Config field, key=value")


def _runnable() -> list[str]:
    return [t.name for t in targets.TARGETS.values() if t.runs_here]


def _targets_help() -> str:
    return "; ".join(f"{t.name}: {t.summary}" for t in targets.TARGETS.values())


def _formats_help() -> str:
    return "; ".join(
        f"{f}: target {' or '.join(targets.targets_of_format(f))}" for f in targets.FORMATS
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="compile a model with graphopt and time it against eager")
    _model_arguments(bench)
    bench.add_argument("--target", default="cpu", choices=_runnable(), help=_targets_help())
    bench.add_argument("--rounds", type=int, default=20)
    bench.set_defaults(func=cmd_bench)
    export = sub.add_parser(
        "export",
        help="optimize a model and write a deployable artifact folder (ONNX, OpenVINO, TVM, "
        "StableHLO, HLS)",
    )
    _model_arguments(export)
    export.add_argument("out_dir", help="the folder to write (must not exist, see --overwrite)")
    export.add_argument("--format", default="onnx", choices=targets.FORMATS, help=_formats_help())
    export.add_argument("--target", help="the format's target (default: its first), see --format")
    export.add_argument(
        "--calibration",
        help="int8 calibration data: 'file.py:batches' (a function returning input tuples) or "
        "'random' (random inputs: for speed only, not accuracy)",
    )
    export.add_argument(
        "--hls-option",
        action="append",
        default=[],
        help="format=hls: key=value of hls_options (part=xc7z020clg400-1, clock_ns=4, io=stream, "
        "reuse_factor=4, max_dsp=200, target_latency_us=20); repeatable",
    )
    export.add_argument(
        "--platforms",
        help="format=stablehlo: the platforms to lower for, comma-separated (cpu, tpu, cuda, "
        "rocm; default cpu,tpu)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    export.set_defaults(func=cmd_export)
    run = sub.add_parser("run", help="load an artifact folder, run it on random inputs, time it")
    run.add_argument("artifact", help="a folder written by graphopt export")
    run.add_argument("--dim", action="append", default=[], help="a dynamic dim's size, name=N")
    run.add_argument("--rounds", type=int, default=20)
    run.set_defaults(func=cmd_run)
    tune = sub.add_parser(
        "tune",
        help="tune TVM's x86 kernels for a model on this machine (kept for later llvm compiles)",
    )
    _model_arguments(tune)
    tune.add_argument(
        "--budget", type=_budget, default=1200.0, help="tuning time: 600, 600s, 20m (default)"
    )
    tune.add_argument("--max-trials", type=int, help="stop after this many candidates")
    tune.add_argument(
        "--rounds", type=int, default=5, help="timing rounds vs eager after tuning (0: none)"
    )
    tune.set_defaults(func=cmd_tune)
    plan = sub.add_parser(
        "plan",
        help="how to train a model on the hardware: data-parallel replicas x pipeline stages, "
        "step time, memory, bytes on the wire and cost per layout (graphopt.plan)",
    )
    _model_arguments(plan)
    plan.add_argument(
        "--device",
        type=_device,
        action="append",
        help="a device kind: name,flops_per_s,memory_bytes,link_bytes_per_s,price_per_hour,count "
        "then optionally per_node=N,node_link_bytes_per_s=B,latency_s=S,overlap=0|1 "
        "(repeatable; default: this CPU, measured)",
    )
    plan.add_argument("--goal", type=float, help="samples/s the layout must reach")
    plan.set_defaults(func=cmd_plan)
    ops = sub.add_parser("ops", help="list the ops a target lowers (its capability list)")
    ops.add_argument(
        "--target", default="llvm", choices=list(targets.TARGETS), help=_targets_help()
    )
    ops.set_defaults(func=cmd_ops)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, NotImplementedError, RuntimeError, VerificationError) as err:
        print(f"graphopt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
