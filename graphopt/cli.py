"""The `graphopt` command: `graphopt bench ...`, `graphopt ops ...`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any


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


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    import graphopt
    from graphopt.bench import compare_speed, format_timings

    options = dict(_parse_option(o) for o in args.option)
    options.setdefault("target", args.target)
    graphopt.Config.from_options(options)  # fail on a bad option before building anything
    model = _load_factory(args.model)().eval()
    inputs = tuple(torch.randn(*shape) for shape in args.input)
    quantized = options.get("quantize") is not None
    if quantized and "calibration" not in options:
        options["calibration"] = [
            tuple(torch.randn(*shape) for shape in args.input) for _ in range(4)
        ]
        print("int8: calibrating on 4 random batches (fine for speed, not for accuracy)")
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
    timings = compare_speed({"eager": model, "graphopt": compiled}, inputs, rounds=args.rounds)
    print(format_timings(timings))
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    from graphopt.lowering import backend_for

    backend = backend_for(args.target)
    if backend.registry.supports_all:
        print(f"target={args.target!r} ({backend.name}) takes the whole graph")
        if args.target == "onnx":
            print(
                "(as far as torch.onnx can translate it: a graph it cannot export runs in "
                "PyTorch, named in the report)"
            )
        return 0
    ops = backend.registry.ops()
    print(f"target={args.target!r} ({backend.name}): {len(ops)} ops with lowering rules")
    for op in ops:
        print(f"  {op}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="compile a model with graphopt and time it against eager")
    bench.add_argument("model", help="'file.py:factory' or 'module:factory' returning an nn.Module")
    bench.add_argument(
        "--input",
        type=_shape,
        action="append",
        required=True,
        help="input shape, e.g. 1,3,224,224 (repeat for several inputs)",
    )
    bench.add_argument("--target", default="cpu")
    bench.add_argument("--option", action="append", default=[], help="Config field, key=value")
    bench.add_argument("--rounds", type=int, default=20)
    bench.set_defaults(func=cmd_bench)
    ops = sub.add_parser("ops", help="list the ops a target lowers (its capability list)")
    ops.add_argument("--target", default="llvm")
    ops.set_defaults(func=cmd_ops)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, NotImplementedError, RuntimeError) as err:
        print(f"graphopt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
