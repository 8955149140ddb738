"""Sweep PyTorch's OpInfo database through `torch.compile(backend="graphopt")` and classify each op.

For every OpInfo in `op_db` that supports float32 on CPU, the first float32 sample input is
wrapped in a function of its tensors and compiled with
`torch.compile(fn, backend="graphopt", options={"target": T}, fullgraph=False)` under
`torch.no_grad()`. Each op gets one status:

    match       output equals eager (`graphopt.testing.compare_outputs`), every node on the target
    fallback    output equals eager, but some nodes ran in PyTorch: the graphopt report lists
                fallbacks (no rule for the target, or a partition the backend could not build)
                or dynamo broke the graph
    no-graph    output equals eager, but dynamo handed graphopt no graph at all
    mismatch    output differs from eager
    error       compile or run raised (or crashed the worker, or passed the per-op timeout)
    skip-eager  not comparable: no float32 sample, eager itself raised, or the output is not a
                function of the inputs (see `not_comparable`)

OpInfo wraps most random ops in `wrapper_set_seed`, which dynamo does not trace: those come out
as no-graph, not skip-eager. Only match and fallback count as coverage.

Ops run in a worker subprocess, so a crash (TVM segfault) or a hang costs one op, not the sweep.

    python -m tests.opinfo.sweep --target cpu --out tests/opinfo/baseline_cpu.json
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

STATUSES = ("match", "fallback", "no-graph", "mismatch", "error", "skip-eager")
PASSING = ("match", "fallback")  # a regression is a baseline op that leaves these
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


def float32_ops() -> dict[str, Any]:
    """The OpInfos of op_db that support float32 on CPU, by `op_key`, in op_db order."""
    import torch
    from torch.testing._internal.common_methods_invocations import op_db

    return {op_key(op): op for op in op_db if op.supports_dtype(torch.float32, "cpu")}


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


def classify(op: Any, target: str) -> Outcome:
    """Compile the first float32 sample of `op` for `target` and compare it with eager."""
    import torch
    import torch.utils._pytree as pytree

    import graphopt
    from graphopt.testing import compare_outputs

    start = time.perf_counter()

    def done(status: str, detail: str = "") -> Outcome:
        return Outcome(status, detail, time.perf_counter() - start)

    reason = not_comparable(op)
    if reason is not None:
        return done("skip-eager", reason)
    try:
        sample = next(iter(op.sample_inputs("cpu", torch.float32)), None)
    except Exception as err:  # a broken sample generator is not our op's fault
        return done("skip-eager", f"sample_inputs raised {_first_line(err)}")
    if sample is None:
        return done("skip-eager", "no float32 sample input")
    leaves, spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def fn(*tensors: torch.Tensor) -> Any:
        flat = list(leaves)
        for i, t in zip(where, tensors):
            flat[i] = t
        x, args, kwargs = pytree.tree_unflatten(flat, spec)
        return op(x, *args, **kwargs)

    def inputs() -> list[torch.Tensor]:  # fresh copies: some ops (resize_, zero_) mutate them
        return [leaves[i].clone() for i in where]

    with torch.no_grad():
        try:
            torch.manual_seed(0)
            expected = fn(*inputs())
            torch.manual_seed(1)
            again = fn(*inputs())
        except Exception as err:  # recorded as the op's status
            return done("skip-eager", f"eager raised {_first_line(err)}")
        if compare_outputs(expected, again) is not None:
            return done("skip-eager", "output changes with the RNG seed (random op)")

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        graphopt.clear_reports()
        compiled = torch.compile(
            fn, backend="graphopt", options={"target": target}, fullgraph=False
        )
        try:
            torch.manual_seed(0)
            got = compiled(*inputs())
        except Exception as err:  # recorded as the op's status
            return done("error", _first_line(err))
        finally:
            breaks = [r.splitlines()[0] for r in torch._dynamo.utils.counters["graph_break"]]
            torch._dynamo.reset()
    problem = compare_outputs(expected, got)
    if problem is not None:
        lines = [line.strip() for line in problem.splitlines() if line.strip()]
        return done("mismatch", " ".join(lines[:4])[:300])
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
    if in_torch or breaks:
        parts = [f"ran in PyTorch: {', '.join(sorted(set(in_torch)))}"] if in_torch else []
        parts += [f"graph break: {'; '.join(breaks)}"] if breaks else []
        return done("fallback", "; ".join(parts)[:300])
    return done("match")


# --- worker protocol: the parent writes an op key per line, the worker answers a JSON line ---


def _worker(target: str) -> None:
    """Serve `classify` requests on stdin; answers go to the real stdout, all else to stderr."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # ops, inductor and TVM print: keep the answer channel clean
    ops = float32_ops()
    answers.write("ready\n")
    for line in sys.stdin:
        key = line.strip()
        if key not in ops:
            outcome = Outcome("error", f"{key!r} is not a float32 CPU op of this torch's op_db")
        else:
            try:
                outcome = classify(ops[key], target)
            except Exception as err:  # a harness bug still gets the op a status
                outcome = Outcome("error", f"sweep harness: {_first_line(err)}")
        answers.write(json.dumps([outcome.status, outcome.detail, outcome.seconds]) + "\n")


class Runner:
    """Classifies ops for one target in a worker subprocess, replaced when it crashes or hangs.

    Args:
        timeout: seconds one op may take; past it the worker is killed and the op is an error.
        log: where the worker's stderr goes (a file object, or subprocess.DEVNULL).
    """

    def __init__(
        self, target: str, *, timeout: float = DEFAULT_TIMEOUT_S, log: Any = subprocess.DEVNULL
    ):
        self.target, self.timeout, self.log = target, timeout, log
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--target", self.target]
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
    timeout: float = DEFAULT_TIMEOUT_S,
    jobs: int = 1,
    progress: Callable[[str], None] | None = print,
    log: Any = subprocess.DEVNULL,
    timings: bool = False,
) -> dict[str, Any]:
    """Classify `keys` (default: every float32 op) for `target`; returns the results document.

    Args:
        timeout: seconds one op may take before its worker is killed (status "error").
        jobs: worker processes run side by side.
        progress: called with a summary line every 25 ops (None: silent).
        log: where the workers' stderr goes (a file object, or subprocess.DEVNULL).
        timings: add each op's seconds ("op_seconds") to the document.
    """
    import torch

    keys = list(float32_ops()) if keys is None else list(keys)
    start = time.perf_counter()
    todo: queue.Queue[str] = queue.Queue()
    for key in keys:
        todo.put(key)
    results: dict[str, Outcome] = {}
    lock = threading.Lock()
    failures: list[BaseException] = []

    def serve() -> None:
        runner = Runner(target, timeout=timeout, log=log)
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
                        progress(_progress_line(target, results, len(keys), start))
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
        progress(_progress_line(target, results, len(keys), start))
    ordered = {key: results[key] for key in keys}
    doc = {
        "target": target,
        "torch": torch.__version__,
        "command": f"python -m tests.opinfo.sweep --target {target}"
        f" --out tests/opinfo/baseline_{target}.json",
        "jobs": jobs,
        "wall_seconds": round(wall, 1),
        "summary": summarize(o.status for o in ordered.values()),
        "ops": {key: o.status for key, o in ordered.items()},
        "details": {key: o.detail for key, o in ordered.items() if o.detail},
    }
    if timings:
        doc["op_seconds"] = {key: round(o.seconds, 2) for key, o in ordered.items()}
    return doc


def regression(target: str, before: str, now: str) -> str | None:
    """Why going from status `before` (baseline) to `now` is a regression, or None if it is not.

    An op that passed (match/fallback) must still pass; on TVM targets an op that matched with
    no fallback must not start falling back to PyTorch (the fallback count must not grow).
    """
    if before not in PASSING:
        return None
    if now not in PASSING:
        return f"was {before!r}, now {now!r}"
    if target != "cpu" and before == "match" and now != "match":
        return f"was 'match' (every node on {target}), now {now!r} (nodes run in PyTorch)"
    return None


def regressions(baseline: dict[str, Any], doc: dict[str, Any]) -> dict[str, str]:
    """{op: why} for every baseline op that regressed (or is missing) in the results `doc`."""
    out = {}
    for key, before in baseline["ops"].items():
        now = doc["ops"].get(key, "missing")
        why = regression(baseline["target"], before, now)
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
        _worker(args.target)
        return 0
    keys = args.op
    if args.ops_from is not None:
        keys = list(json.loads(args.ops_from.read_text())["ops"])
    if args.inline:
        ops = float32_ops()
        for key in keys or ops:
            outcome = classify(ops[key], args.target)
            print(f"{key}: {outcome.status} ({outcome.seconds:.1f} s) {outcome.detail}")
        return 0
    log = open(args.log, "a") if args.log else subprocess.DEVNULL
    try:
        doc = run_sweep(
            args.target, keys, timeout=args.timeout, jobs=args.jobs, log=log, timings=args.timings
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
