"""Sweep PyTorch's OpInfo database through `torch.compile(backend="graphopt")` and classify each op.

For every OpInfo in `op_db` that supports float32 on CPU, the first float32 sample input is
wrapped in a function of its tensors and compiled with
`torch.compile(fn, backend="graphopt", options={"target": T}, fullgraph=False)`. Modes:

    forward     under `torch.no_grad()` (inference graphs); the output is compared with eager's
    grad        the sample's tensors require grad (training graphs): the output and the gradient
                of every input, for a fixed random cotangent of each differentiable output, are
                compared with eager's; ops whose OpInfo does not support autograd are left out
    gradgrad    as grad, then the gradients' own gradients (double backward): equal to eager's,
                or torch.compile's refusal (aot_autograd has no double backward in torch 2.13;
                inductor refuses the same way)

Each op gets one status:

    match       same numbers as eager, every node on the target (grad: forward and backward)
    fallback    same numbers as eager, but some nodes ran in PyTorch: the graphopt report lists
                fallbacks (no rule for the target, or a partition the backend could not build)
                or dynamo broke the graph (grad: or no backward graph reached graphopt)
    no-graph    same numbers as eager, but dynamo handed graphopt no graph at all
    refused     torch.compile refused (gradgrad only): the error inductor gives as well
    mismatch    numbers differ from eager
    error       compile or run raised (or crashed the worker, or passed the per-op timeout)
    skip-eager  not comparable: no float32 sample, eager itself raised, or the output is not a
                function of the inputs (see `not_comparable`)

OpInfo wraps most random ops in `wrapper_set_seed`, which dynamo does not trace: those come out
as no-graph, not skip-eager. Only match and fallback count as coverage.

Ops run in a worker subprocess, so a crash (TVM segfault) or a hang costs one op, not the sweep.

    python -m tests.opinfo.sweep --target cpu --out tests/opinfo/baseline_cpu.json
    python -m tests.opinfo.sweep --target cpu --mode grad --out tests/opinfo/baseline_cpu_grad.json
    python -m tests.opinfo.sweep --target xla --out tests/opinfo/baseline_xla.json
    python -m tests.opinfo.sweep --target llvm --op nn.functional.relu --inline   # debug one op
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUSES = ("match", "fallback", "no-graph", "refused", "mismatch", "error", "skip-eager")
MODES = ("forward", "grad", "gradgrad")
PASSING = ("match", "fallback")  # a regression is a baseline op that leaves these
# torch.compile's own refusal of double backward (the same with inductor and aot_eager)
DOUBLE_BACKWARD_REFUSAL = "torch.compile with aot_autograd does not currently support double"
DEFAULT_TIMEOUT_S = 120.0  # per op; the slowest measured 13 s (the first op: inductor starts cold)

# Ops whose output is not a function of their inputs, so eager and compiled cannot agree
# except by chance. OpInfo flags most of them (`has_nondeterministic_output` for
# uninitialized memory, `skip_correctness_check_compile_vs_eager`); random ops are caught by
# running eager under two RNG seeds. This list is for what neither rule catches.
NOT_COMPARABLE: dict[str, str] = {}


@dataclass(frozen=True)
class Outcome:
    status: str
    detail: str = ""
    seconds: float = 0.0


def op_key(op: Any) -> str:
    """'name' or 'name.variant', unique in op_db."""
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def float32_ops(mode: str = "forward") -> dict[str, Any]:
    """The OpInfos of op_db that support float32 on CPU (for `mode` "grad"/"gradgrad": and
    float32 autograd, or double backward), by `op_key`, in op_db order."""
    import torch
    from torch.testing._internal.common_methods_invocations import op_db

    def wanted(op: Any) -> bool:
        if mode == "forward":
            return op.supports_dtype(torch.float32, "cpu")
        if torch.float32 not in op.supported_backward_dtypes("cpu"):
            return False
        return op.supports_autograd and (mode == "grad" or op.supports_gradgrad)

    return {op_key(op): op for op in op_db if wanted(op)}


def not_comparable(op: Any) -> str | None:
    """Why an op's eager output cannot be compared with a compiled one, or None."""
    key = op_key(op)
    if key in NOT_COMPARABLE:
        return NOT_COMPARABLE[key]
    if getattr(op, "has_nondeterministic_output", False):
        return "OpInfo.has_nondeterministic_output (uninitialized memory or nondeterministic)"
    if getattr(op, "skip_correctness_check_compile_vs_eager", False):
        return "OpInfo.skip_correctness_check_compile_vs_eager"
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    # dynamo wraps backend errors as "backend='graphopt' raised:\nRealError: message"
    for line in lines:
        if line.strip() and not line.startswith("backend="):
            return f"{type(err).__name__}: {line.strip()[:300]}"
    return type(err).__name__


# A random op is one whose eager output changes when the RNG is seeded with one of these
# rather than 0. Several: a random op with few choices to draw from (a fractional max pool
# of a small input) can draw the same under two seeds.
OTHER_SEEDS = (1, 2, 3)

# Samples per op: forward mode compiles the first one; the grad modes compile up to this many,
# spread over the op's sample list, in one graph (one compile, however many samples): an op's
# first sample often misses the path a bug is on (the fused CPU attention whose decomposition
# broke its gradients only runs for 4-d inputs, OpInfo's fifth sample).
GRAD_SAMPLES = 6


class _Sample:
    """One OpInfo sample as a function of its tensors, with fresh inputs for every run."""

    def __init__(self, op: Any, sample: Any):
        import torch
        import torch.utils._pytree as pytree

        self.op = op
        self.leaves, self.spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
        self.where = [i for i, x in enumerate(self.leaves) if isinstance(x, torch.Tensor)]

    def __call__(self, *tensors: Any) -> Any:
        import torch.utils._pytree as pytree

        flat = list(self.leaves)
        for i, t in zip(self.where, tensors):
            flat[i] = t
        x, args, kwargs = pytree.tree_unflatten(flat, self.spec)
        return self.op(x, *args, **kwargs)

    def inputs(self) -> list[Any]:
        """Fresh copies (some ops, resize_ or zero_, mutate their inputs), grad flags kept."""
        return [
            self.leaves[i].detach().clone().requires_grad_(self.leaves[i].requires_grad)
            for i in self.where
        ]

    def differentiable(self) -> bool:
        return any(self.leaves[i].requires_grad for i in self.where)


def _pick_samples(op: Any, grad: bool) -> list[Any]:
    import torch

    samples = op.sample_inputs("cpu", torch.float32, requires_grad=grad)
    if not grad:
        first = next(iter(samples), None)
        return [] if first is None else [first]
    samples = list(samples)
    step = max(1.0, len(samples) / GRAD_SAMPLES)
    return [samples[int(k * step)] for k in range(min(GRAD_SAMPLES, len(samples)))]


def _run(samples: list[_Sample], fn: Any, mode: str) -> list[Any]:
    """Each sample's output from `fn(*every sample's inputs)` (grad modes: with the gradients of
    its inputs, see `_gradients`), on fresh inputs."""
    inputs = [sample.inputs() for sample in samples]
    outs = fn(*[x for xs in inputs for x in xs])
    if mode == "forward":
        return list(outs)
    grads = _gradients(outs, inputs, twice=mode == "gradgrad")
    return [(_detached(out), g) for out, g in zip(outs, grads)]


def _bundle(samples: list[_Sample]) -> Callable[..., tuple[Any, ...]]:
    """One function of every sample's tensors that returns every sample's output."""
    sizes = [len(sample.where) for sample in samples]

    def fn(*tensors: Any) -> tuple[Any, ...]:
        outs, k = [], 0
        for sample, n in zip(samples, sizes):
            outs.append(sample(*tensors[k : k + n]))
            k += n
        return tuple(outs)

    return fn


def classify(op: Any, target: str, mode: str = "forward") -> Outcome:
    """Compile `op`'s samples for `target` and compare them with eager (see the module
    docstring for the modes)."""
    import contextlib

    import torch

    import graphopt
    from graphopt.testing import compare_outputs

    start = time.perf_counter()
    grad = mode != "forward"

    def done(status: str, detail: str = "") -> Outcome:
        return Outcome(status, detail, time.perf_counter() - start)

    reason = not_comparable(op)
    if reason is not None:
        return done("skip-eager", reason)
    _trace_through_seeding()
    try:
        picked = [_Sample(op, sample) for sample in _pick_samples(op, grad)]
    except Exception as err:  # a broken sample generator is not our op's fault
        return done("skip-eager", f"sample_inputs raised {_first_line(err)}")
    if not picked:
        return done("skip-eager", "no float32 sample input")
    with contextlib.nullcontext() if grad else torch.no_grad():
        # Eager, each sample alone, under several seeds: the samples kept are those eager runs,
        # whose output does not change with the seed and, in the grad modes, has gradients.
        samples, expected, why = [], [], "no input of any sample requires grad"
        for sample in picked:
            if grad and not sample.differentiable():
                continue
            try:
                torch.manual_seed(0)
                (first,) = _run([sample], _bundle([sample]), mode)
                others = []
                for seed in OTHER_SEEDS:
                    torch.manual_seed(seed)
                    others.append(_run([sample], _bundle([sample]), mode)[0])
            except Exception as err:  # the sample's status, if no sample is left
                why = f"eager raised {_first_line(err)}"
                continue
            if grad and first[1] is None:
                why = "no output of the samples is differentiable"
            elif any(compare_outputs(first, again) is not None for again in others):
                why = "output changes with the RNG seed (random op)"
            else:
                samples.append(sample)
                expected.append(first)
        if not samples:
            return done("skip-eager", why)

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        graphopt.clear_reports()
        compiled = torch.compile(
            _bundle(samples), backend="graphopt", options={"target": target}, fullgraph=False
        )
        try:
            torch.manual_seed(0)
            got = _run(samples, compiled, mode)
        except Exception as err:  # recorded as the op's status
            if mode == "gradgrad" and DOUBLE_BACKWARD_REFUSAL in str(err):
                return done("refused", _first_line(err))
            return done("error", _first_line(err))
        finally:
            breaks = [r.splitlines()[0] for r in torch._dynamo.utils.counters["graph_break"]]
            torch._dynamo.reset()
    for k, (want, have) in enumerate(zip(expected, got)):
        problem = compare_outputs(want, have)
        if problem is not None:
            lines = [line.strip() for line in problem.splitlines() if line.strip()]
            what = ("gradient: " if "output 0" not in problem else "output: ") if grad else ""
            where = f"sample {k + 1} of {len(samples)}: " if len(samples) > 1 else ""
            return done("mismatch", where + what + " ".join(lines[:4])[:300])
    reports = graphopt.reports()
    if not reports:
        return done("no-graph", "dynamo compiled no graph (ran eagerly)")
    # A node with no rule is listed by its op; a partition the backend could not build, by
    # its name and the reason.
    in_torch = [
        f"{f.node} ({f.reason})" if f.op == "partition" else f.op
        for r in reports
        for f in r.fallbacks
    ]
    parts = [f"ran in PyTorch: {', '.join(sorted(set(in_torch)))}"] if in_torch else []
    parts += [f"graph break: {'; '.join(breaks)}"] if breaks else []
    if grad and not any(r.mode == "training-backward" for r in reports):
        parts.append("no backward graph reached graphopt (the backward ran eagerly)")
    if parts:
        return done("fallback", "; ".join(parts)[:300])
    return done("match")


def _trace_through_seeding() -> None:
    """OpInfo calls ops that may draw random numbers (dropout, attention with dropout_p) through
    `wrapper_set_seed(op, ...)`, which seeds the RNG inside and which dynamo does not trace: no
    graph at all, even for the samples that draw nothing (attention with dropout_p=0). The
    sweep seeds the RNG itself before every eager and compiled run, so it calls such ops
    directly; those that do draw numbers are then told apart by running eager under two seeds
    (skip-eager, "random op")."""
    from torch.testing._internal import common_methods_invocations as cmi

    cmi.wrapper_set_seed = _call


def _call(op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return op(*args, **kwargs)


def _detached(out: Any) -> Any:
    import torch
    import torch.utils._pytree as pytree

    return pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, out)


def _gradients(outs: tuple[Any, ...], inputs: list[list[Any]], *, twice: bool) -> list[Any]:
    """Per sample, the gradients of its inputs that require grad, for a fixed random cotangent
    of each of its differentiable outputs (None where it has none); twice: the gradients of
    those gradients, for another fixed cotangent, beside them. The cotangents of a sample are
    the same whether it runs alone or bundled with others."""
    import torch
    import torch.utils._pytree as pytree

    def differentiable(tree: Any) -> list[Any]:
        leaves = pytree.tree_leaves(tree)
        return [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]

    def cotangents(ts: list[Any], seed: int) -> list[Any]:
        generator = torch.Generator().manual_seed(seed)
        return [torch.randn(t.shape, dtype=t.dtype, generator=generator) for t in ts]

    def backward(ys: list[list[Any]], seed: int, create_graph: bool) -> list[tuple[Any, ...]]:
        """The gradients of every sample's inputs for the cotangents of every sample's `ys`."""
        flat_ys = [y for group in ys for y in group]
        flat_cotangents = [c for group in ys for c in cotangents(group, seed)]
        every = [x for xs in wrt for x in xs]
        grads = torch.autograd.grad(
            flat_ys, every, flat_cotangents, allow_unused=True, create_graph=create_graph
        )
        out, k = [], 0
        for xs in wrt:
            out.append(tuple(grads[k : k + len(xs)]))
            k += len(xs)
        return out

    wrt = [[x for x in xs if x.requires_grad] for xs in inputs]
    ys = [differentiable(out) for out in outs]
    if not any(ys):
        return [None] * len(inputs)
    grads = backward(ys, 2, create_graph=twice)
    if not twice:
        return [g if y else None for g, y in zip(grads, ys)]
    again = [differentiable(g) for g in grads]
    if not any(again):
        return [None] * len(inputs)
    second = backward(again, 3, create_graph=False)
    return [(_detached(g), g2) if a else None for g, g2, a in zip(grads, second, again)]


# --- worker protocol: the parent writes an op key per line, the worker answers a JSON line ---


def _worker(target: str, mode: str) -> None:
    """Serve `classify` requests on stdin; answers go to the real stdout, all else to stderr."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # ops, inductor and TVM print: keep the answer channel clean
    ops = float32_ops(mode)
    answers.write("ready\n")
    for line in sys.stdin:
        key = line.strip()
        if key not in ops:
            outcome = Outcome("error", f"{key!r} is not a {mode} float32 CPU op of this op_db")
        else:
            try:
                outcome = classify(ops[key], target, mode)
            except Exception as err:  # a harness bug still gets the op a status
                outcome = Outcome("error", f"sweep harness: {_first_line(err)}")
        answers.write(json.dumps([outcome.status, outcome.detail, outcome.seconds]) + "\n")


class Runner:
    """Classifies ops for one target in a worker subprocess, replaced when it crashes or hangs.

    Args:
        mode: "forward", "grad" or "gradgrad" (see the module docstring).
        timeout: seconds one op may take; past it the worker is killed and the op is an error.
        log: where the worker's stderr goes (a file object, or subprocess.DEVNULL).
    """

    def __init__(
        self,
        target: str,
        *,
        mode: str = "forward",
        timeout: float = DEFAULT_TIMEOUT_S,
        log: Any = subprocess.DEVNULL,
    ):
        self.target, self.mode, self.timeout, self.log = target, mode, timeout, log
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--target", self.target]
        cmd += ["--mode", self.mode]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
        if self._next(600.0) != "ready":
            code = self.close()
            raise RuntimeError(
                f"opinfo sweep worker did not start (exit code {code}); run "
                f"`python {Path(__file__).name} --inline --op abs` to see why"
            )

    @staticmethod
    def _read(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)

    def _next(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def classify(self, key: str) -> Outcome:
        if self.proc is not None and self.proc.poll() is not None:
            self.close()  # died after its last answer
        if self.proc is None:
            self._start()
        start = time.perf_counter()
        try:
            self.proc.stdin.write(key + "\n")
            self.proc.stdin.flush()
            line = self._next(self.timeout)
        except BrokenPipeError:
            line = None
        if line is None:  # hung or crashed: the worker goes, the next op gets a fresh one
            hung = self.proc.poll() is None
            code = self.close()
            why = (
                f"Timeout: more than {self.timeout:.0f} s"
                if hung
                else f"WorkerCrashed: exit code {code}"
            )
            return Outcome("error", why, time.perf_counter() - start)
        status, detail, seconds = json.loads(line)
        return Outcome(status, detail, seconds)

    def close(self) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.kill()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        return proc.wait()


def run_sweep(
    target: str,
    keys: Sequence[str] | None = None,
    *,
    mode: str = "forward",
    timeout: float = DEFAULT_TIMEOUT_S,
    jobs: int = 1,
    progress: Callable[[str], None] | None = print,
    log: Any = subprocess.DEVNULL,
    timings: bool = False,
) -> dict[str, Any]:
    """Classify `keys` (default: every float32 op of `mode`) for `target`; returns the results
    document.

    Args:
        mode: "forward", "grad" or "gradgrad" (see the module docstring).
        timeout: seconds one op may take before its worker is killed (status "error").
        jobs: worker processes run side by side.
        progress: called with a summary line every 25 ops (None: silent).
        log: where the workers' stderr goes (a file object, or subprocess.DEVNULL).
        timings: add each op's seconds ("op_seconds") to the document.
    """
    import torch

    name = baseline_name(target, mode)
    keys = list(float32_ops(mode)) if keys is None else list(keys)
    start = time.perf_counter()
    todo: queue.Queue[str] = queue.Queue()
    for key in keys:
        todo.put(key)
    results: dict[str, Outcome] = {}
    lock = threading.Lock()
    failures: list[BaseException] = []

    def serve() -> None:
        runner = Runner(target, mode=mode, timeout=timeout, log=log)
        try:
            while True:
                try:
                    key = todo.get_nowait()
                except queue.Empty:
                    return
                outcome = runner.classify(key)
                with lock:
                    results[key] = outcome
                    if progress is not None and len(results) % 25 == 0:
                        progress(_progress_line(name, results, len(keys), start))
        except BaseException as err:  # re-raised by the caller below
            failures.append(err)
        finally:
            runner.close()

    threads = [threading.Thread(target=serve) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    wall = time.perf_counter() - start
    if progress is not None:
        progress(_progress_line(name, results, len(keys), start))
    ordered = {key: results[key] for key in keys}
    doc = {
        "target": target,
        "mode": mode,
        "torch": torch.__version__,
        "command": f"python -m tests.opinfo.sweep --target {target} --mode {mode}"
        f" --out tests/opinfo/baseline_{name}.json",
        "jobs": jobs,
        "wall_seconds": round(wall, 1),
        "summary": summarize(o.status for o in ordered.values()),
        "ops": {key: o.status for key, o in ordered.items()},
        "details": {key: o.detail for key, o in ordered.items() if o.detail},
    }
    if timings:
        doc["op_seconds"] = {key: round(o.seconds, 2) for key, o in ordered.items()}
    return doc


def baseline_name(target: str, mode: str = "forward") -> str:
    """The baseline of `target` in `mode` is tests/opinfo/baseline_<name>.json."""
    if mode not in MODES:
        raise ValueError(f"sweep mode {mode!r}: expected one of {', '.join(MODES)}")
    return target if mode == "forward" else f"{target}_{mode}"


def regression(target: str, before: str, now: str, mode: str = "forward") -> str | None:
    """Why going from status `before` (baseline) to `now` is a regression, or None if it is not.

    An op that passed (match/fallback) must still pass. On the TVM and XLA targets, and in the
    grad modes, an op that matched must not start running in PyTorch (a node falling back to
    PyTorch, or a backward that no longer reaches graphopt); on "cpu" in forward mode a new
    graph break is dynamo's affair.
    """
    if before not in PASSING:
        return None
    if now not in PASSING:
        return f"was {before!r}, now {now!r}"
    if (target != "cpu" or mode != "forward") and before == "match" and now != "match":
        return f"was 'match' (every node on {target}), now {now!r} (nodes run in PyTorch)"
    return None


def regressions(baseline: dict[str, Any], doc: dict[str, Any]) -> dict[str, str]:
    """{op: why} for every baseline op that regressed (or is missing) in the results `doc`."""
    out = {}
    for key, before in baseline["ops"].items():
        now = doc["ops"].get(key, "missing")
        why = regression(baseline["target"], before, now, baseline.get("mode", "forward"))
        if why is not None:
            detail = doc.get("details", {}).get(key, "")
            out[key] = f"{why}: {detail}" if detail else why
    return out


def summarize(statuses: Iterable[str]) -> dict[str, int]:
    counts = Counter(statuses)
    summary = {"tried": sum(counts.values())}
    summary.update({s: counts.get(s, 0) for s in STATUSES})
    return summary


def _progress_line(target: str, results: dict[str, Outcome], total: int, start: float) -> str:
    counts = summarize(o.status for o in results.values())
    del counts["tried"]
    what = " ".join(f"{k}={v}" for k, v in counts.items())
    return f"[{target}] {len(results)}/{total} ops, {time.perf_counter() - start:.0f} s: {what}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cpu", help="graphopt target (cpu, llvm, ...)")
    parser.add_argument("--mode", default="forward", choices=MODES, help="see the docstring")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument("--op", action="append", help="only this op key (repeatable)")
    parser.add_argument(
        "--ops-from", type=Path, help="only the ops of this results JSON (e.g. a baseline)"
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per op")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--log", type=Path, help="append the workers' stderr to this file")
    parser.add_argument("--timings", action="store_true", help="record each op's seconds")
    parser.add_argument(
        "--compare", type=Path, help="a baseline JSON: exit 1 if an op regressed against it"
    )
    parser.add_argument(
        "--inline",
        action="store_true",
        help="run in this process and print each op's detail (debugging)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.target, args.mode)
        return 0
    keys = args.op
    if args.ops_from is not None:
        keys = list(json.loads(args.ops_from.read_text())["ops"])
    if args.inline:
        ops = float32_ops(args.mode)
        for key in keys or ops:
            outcome = classify(ops[key], args.target, args.mode)
            print(f"{key}: {outcome.status} ({outcome.seconds:.1f} s) {outcome.detail}")
        return 0
    log = open(args.log, "a") if args.log else subprocess.DEVNULL
    try:
        doc = run_sweep(
            args.target,
            keys,
            mode=args.mode,
            timeout=args.timeout,
            jobs=args.jobs,
            log=log,
            timings=args.timings,
        )
    finally:
        if args.log:
            log.close()
    print(json.dumps(doc["summary"]), f"wall {doc['wall_seconds']} s")
    if args.out is not None:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    if args.compare is not None:
        baseline = json.loads(args.compare.read_text())
        if keys is not None:
            baseline["ops"] = {k: v for k, v in baseline["ops"].items() if k in keys}
        found = regressions(baseline, doc)
        for key, why in found.items():
            print(f"REGRESSION {args.target} {key}: {why}")
        print(f"{len(found)} regression(s) against {args.compare}")
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
