"""Side-by-side benchmark suite: `python -m benchmarks.run [--smoke]` (see --help).

For each model: build it, compile every runner (compile seconds, max abs and relative L2 error
against eager on the same input), time them in interleaved rounds
(`graphopt.bench.compare_speed`), and print a markdown table of medians and ratios: against eager,
the fastest fp32 anchor, and for the int8 runners the fastest int8 anchor and graphopt's fp32
through the same entry. Ratios are what count; absolute times on shared machines are noise. A
runner that fails is a row with the reason, never a crash.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.metadata
import inspect
import math
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

import graphopt
from graphopt.bench import StolenTime, Timing, compare_speed, format_timings, stolen_suspect

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.models import CALIBRATION_BATCHES, FULL, MODELS, TINY, BenchModel  # noqa: E402
from benchmarks.runners import (  # noqa: E402
    ANCHORS,
    CUDA_RUNNERS,
    HALF_ANCHOR,
    HALF_RUNNERS,
    INT8_ANCHORS,
    INT8_RUNNERS,
    PRUNED_RUNNERS,
    RUNNERS,
)

Log = Callable[[str], None]
Batch = tuple[torch.Tensor, ...]

# int8 is lossy: an int8 runner's relative L2 error of a few percent is expected; above this it
# is flagged in its note as suspect (a broken quantization is typically off by 30% or more).
INT8_REL_ERROR_TOLERANCE = 0.1
FP32_BASELINE = "graphopt-cpu"  # what graphopt's int8 runners are also measured against
# An int8 runner's own fp32 twin (same entry, same target), where it is not FP32_BASELINE:
# the speed int8 buys is measured against the float model through the same entry.
FP32_OF = {
    "graphopt-cpu-int8-optimize": "graphopt-cpu-optimize",
    "graphopt-auto-int8": "graphopt-auto",
    "graphopt-auto-int8-optimize": "graphopt-auto-optimize",
}


def fp32_of(name: str, timed: Iterable[str]) -> str:
    """The graphopt fp32 runner the int8 runner `name` is measured against: its twin in FP32_OF
    when `timed` (the runners with a median) holds it, else FP32_BASELINE."""
    twin = FP32_OF.get(name)
    return twin if twin is not None and twin in timed else FP32_BASELINE


@dataclass
class RunnerResult:
    name: str
    compile_s: float = math.nan
    max_error: float = math.nan
    rel_error: float = math.nan  # ||out - eager|| / ||eager|| (2-norms over all outputs)
    samples_ms: list[float] = field(default_factory=list)
    note: str = ""
    failed: bool = False
    params_kept: float = math.nan  # pruned runners: conv/linear weights kept / dense
    top1: float = math.nan  # 16-bit runners: argmax over the last dim = eager's, on other inputs


@dataclass
class ModelResult:
    model: str
    runners: list[RunnerResult]
    timings: list[Timing]
    output_scale: float  # max |eager output|, to read the errors against
    stolen: float = math.nan  # share of CPU time the hypervisor took while timing (Linux)

    def anchor(self, among: Sequence[str] = ANCHORS) -> str | None:
        """The fastest of the anchor runners `among` that ran (default: the fp32 anchors,
        inductor with freezing and onnxruntime)."""
        timed = {t.name: t.median_ms for t in self.timings if not math.isnan(t.median_ms)}
        anchors = [a for a in among if a in timed]
        return min(anchors, key=timed.__getitem__) if anchors else None

    def int8_anchor(self) -> str | None:
        """The fastest int8 anchor that ran (PT2E + inductor, onnxruntime static/dynamic)."""
        return self.anchor(INT8_ANCHORS)


class CompileBudgetExceeded(Exception):
    pass


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise CompileBudgetExceeded in the main thread after `seconds` (a no-op elsewhere)."""
    if seconds <= 0 or not hasattr(signal, "setitimer") or not _in_main_thread():
        yield
        return

    def expire(signum, frame):
        raise CompileBudgetExceeded(f"compile took over the {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _reason(err: BaseException) -> str:
    """The innermost cause of `err`, one line, safe inside a markdown table."""
    while True:  # dynamo wraps backend errors (BackendCompilerFailed.inner_exception)
        inner = getattr(err, "inner_exception", None) or err.__cause__
        if inner is None:
            break
        err = inner
    text = " ".join(str(err).split()) or repr(err)
    text = text.split(" Set TORCHDYNAMO_VERBOSE=1")[0]
    text = text.replace("|", "/")
    return f"does not run: {type(err).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _rel_error(ref, got) -> float:
    """||got - ref|| / ||ref|| over all output tensors together (inf if the structure differs)."""
    ref_leaves, got_leaves = pytree.tree_leaves(ref), pytree.tree_leaves(got)
    if len(ref_leaves) != len(got_leaves):
        return math.inf
    diff = sum(
        (r.double() - g.double().reshape(r.shape)).square().sum().item()
        for r, g in zip(ref_leaves, got_leaves)
    )
    norm = sum(r.double().square().sum().item() for r in ref_leaves)
    return math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff)


def _max_error(ref, got) -> float:
    ref_leaves, got_leaves = pytree.tree_leaves(ref), pytree.tree_leaves(got)
    if len(ref_leaves) != len(got_leaves):
        return math.inf
    errors = [
        (r.float() - g.float().reshape(r.shape)).abs().max().item()
        for r, g in zip(ref_leaves, got_leaves)
    ]
    return max(errors, default=0.0)


def _top1_agreement(model: torch.nn.Module, fn: Callable, batches: Sequence[Batch]) -> float:
    """Share of positions where `fn`'s argmax over the output's last dim (the class, or the
    hidden feature of each token) equals eager fp32's, over `batches` (drawn like the input
    with other seeds)."""
    same = total = 0
    with torch.no_grad():
        for batch in batches:
            ref, got = model(*batch), fn(*batch)
            ref, got = pytree.tree_leaves(ref)[0], pytree.tree_leaves(got)[0]
            agree = ref.argmax(-1) == got.reshape(ref.shape).argmax(-1)
            same, total = same + int(agree.sum()), total + agree.numel()
    return same / total if total else math.nan


def _graphopt_note(new_reports: list[graphopt.Report]) -> str:
    fallbacks = [f.op for r in new_reports for f in r.fallbacks]
    note = f"{len(new_reports)} graphs" if len(new_reports) != 1 else ""
    if fallbacks:
        ops = sorted(set(fallbacks))
        note = _join(note, f"{len(fallbacks)} node(s) ran in PyTorch ({', '.join(ops[:4])}")
        note += ", ...)" if len(ops) > 4 else ")"
    return note


def _params_kept(new_reports: list[graphopt.Report]) -> float:
    """Conv/linear weights the prune pass kept, as a fraction (nan when nothing was pruned)."""
    layers = [layer for r in new_reports if r.pruning is not None for layer in r.pruning.layers]
    before = sum(layer.params_before for layer in layers)
    return sum(layer.params_after for layer in layers) / before if before else math.nan


def compile_runner(
    name: str,
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    reference,
    compile_budget_s: float,
    calibration: Sequence[Batch] | None = None,
) -> tuple[RunnerResult, Callable | None]:
    """Build one runner and call it once: compile time, errors, and the callable (or None).

    Builders with a `calibration` parameter (the int8 runners) get `calibration`; the time to
    calibrate and quantize is part of their compile time.
    """
    result = RunnerResult(name)
    model = model if name == "eager" else copy.deepcopy(model)
    builder = RUNNERS[name]
    calibrates = "calibration" in inspect.signature(builder).parameters
    reports_before = len(graphopt.reports())
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as workdir:
        start = time.perf_counter()
        try:
            with _deadline(compile_budget_s), torch.no_grad():
                if not calibrates:
                    fn = builder(model, inputs, workdir)
                elif calibration is None:
                    raise ValueError(f"{name} needs calibration batches")
                else:
                    fn = builder(model, inputs, workdir, calibration=list(calibration))
                out = fn(*inputs)
        except Exception as err:  # noqa: BLE001 - a failing runner is a row in the table
            result.compile_s = time.perf_counter() - start
            result.note, result.failed = _reason(err), True
            return result, None
        result.compile_s = time.perf_counter() - start
    result.max_error = _max_error(reference, out)
    result.rel_error = _rel_error(reference, out)
    if name.startswith("graphopt"):
        result.note = _graphopt_note(graphopt.reports()[reports_before:])
        result.params_kept = _params_kept(graphopt.reports()[reports_before:])
    result.note = _join(result.note, getattr(fn, "note", ""))
    result.params_kept = getattr(fn, "params_kept", result.params_kept)
    if name in HALF_RUNNERS and calibration:
        result.top1 = _top1_agreement(model, fn, calibration)
    if name in INT8_RUNNERS and not result.rel_error <= INT8_REL_ERROR_TOLERANCE:
        result.note = _join(
            f"SUSPECT: rel L2 err over the {INT8_REL_ERROR_TOLERANCE:.0%} int8 tolerance",
            result.note,
        )
    return result, fn


def bench_model(
    bm: BenchModel,
    runner_names: Sequence[str],
    *,
    rounds: int,
    warmup: int,
    budget_s: float,
    compile_budget_s: float,
    device: str = "cpu",
    log: Log = print,
) -> ModelResult:
    """Compile every runner on one model, then time the ones that run, interleaved.
    With `device` "cuda" the model and its inputs live on the GPU (timings synchronize)."""
    torch._dynamo.reset()
    model, inputs, calibration = bm.make(), bm.inputs(), bm.calibration()
    if device != "cpu":
        model, inputs = model.to(device), tuple(t.to(device) for t in inputs)
        calibration = [tuple(t.to(device) for t in batch) for batch in calibration]
    with torch.no_grad():
        reference = model(*inputs)
    results, callables, max_rounds, max_warmup = [], {}, {}, {}
    for name in runner_names:
        log(f"[{bm.name}] {name}: compiling ...")
        result, fn = compile_runner(
            name, model, inputs, reference, compile_budget_s, calibration=calibration
        )
        results.append(result)
        if fn is None:
            log(f"[{bm.name}] {name}: {result.note}")
            continue
        with torch.no_grad():  # one timed call decides how many rounds fit in the budget
            start = time.perf_counter()
            fn(*inputs)
            probe_s = time.perf_counter() - start
        calls = int(budget_s // probe_s) if probe_s > 0 else rounds + warmup
        log(
            f"[{bm.name}] {name}: compile {result.compile_s:.1f} s, one call "
            f"{probe_s * 1e3:.1f} ms, max abs error {result.max_error:.2e}, "
            f"rel L2 error {result.rel_error:.2e}"
        )
        if calls < 1:  # over budget: the probe call is its only sample
            result.samples_ms = [probe_s * 1e3]
            result.note = _join(result.note, f"over the {budget_s:g} s budget: 1 call")
            continue
        if calls < rounds + warmup:
            max_rounds[name], max_warmup[name] = min(calls, rounds), 0
            result.note = _join(result.note, f"{max_rounds[name]} round(s): {budget_s:g} s budget")
        callables[name] = fn
    log(f"[{bm.name}] timing {len(callables)} runner(s), {rounds} interleaved round(s) ...")
    with StolenTime() as stolen:
        timed = compare_speed(
            callables,
            inputs,
            rounds=rounds,
            warmup=warmup,
            max_rounds=max_rounds,
            max_warmup=max_warmup,
        )
    if stolen.suspect:
        log(f"[{bm.name}] {stolen.warning()}")
    for t in timed:
        next(r for r in results if r.name == t.name).samples_ms = t.samples_ms
    timings = [Timing.from_samples(r.name, r.samples_ms) for r in results]
    scale = max((x.abs().max().item() for x in pytree.tree_leaves(reference)), default=0.0)
    del model, callables
    gc.collect()
    return ModelResult(bm.name, results, timings, scale, stolen.share)


def run_suite(
    model_names: Sequence[str],
    runner_names: Sequence[str],
    *,
    rounds: int = 10,
    warmup: int = 2,
    budget_s: float = 20.0,
    compile_budget_s: float = 300.0,
    device: str = "cpu",
    log: Log = print,
) -> list[ModelResult]:
    """Benchmark each model in turn; every runner that ran gets a row, and so does every failure."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return [
        bench_model(
            MODELS[m],
            runner_names,
            rounds=rounds,
            warmup=warmup,
            budget_s=budget_s,
            compile_budget_s=compile_budget_s,
            device=device,
            log=log,
        )
        for m in model_names
    ]


def format_half_summary(results: Sequence[ModelResult]) -> str:
    """16-bit runners on each model: speed vs OpenVINO's runtime in its default precision and
    vs graphopt fp32, error and top-1 agreement with eager fp32."""
    lines = [
        f"| model | runner | median ms | speed vs {HALF_ANCHOR} | speed vs {FP32_BASELINE} "
        "| rel L2 err | top-1 = eager fp32 | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        ms = {t.name: t.median_ms for t in res.timings if not math.isnan(t.median_ms)}
        for r in res.runners:
            if r.name not in HALF_RUNNERS:
                continue
            if r.name not in ms:
                lines.append(f"| {res.model} | {r.name} | - | - | - | - | - | {r.note} |")
                continue
            cells = [res.model, r.name, f"{ms[r.name]:.2f}", _speed(ms, HALF_ANCHOR, r.name)]
            cells += [_speed(ms, FP32_BASELINE, r.name), _cell(r.rel_error, ".1e")]
            cells += [_cell(r.top1 * 100, ".1f") + "%" if not math.isnan(r.top1) else "-", r.note]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _has_int8(result: ModelResult) -> bool:
    return any(r.name in INT8_RUNNERS for r in result.runners)


def format_model(result: ModelResult) -> str:
    """The model's table: ratios to eager and the fastest fp32 anchor, and when int8 runners
    ran, to the fastest int8 anchor and to graphopt-cpu (fp32) (for every row alike)."""
    anchor, int8_anchor = result.anchor(), result.int8_anchor()
    timed = {t.name for t in result.timings if not math.isnan(t.median_ms)}
    ratios = ["eager"] + ([anchor] if anchor else [])
    if _has_int8(result) or any(r.name in PRUNED_RUNNERS for r in result.runners):
        ratios += [int8_anchor] if int8_anchor else []
        ratios += [n for n in (FP32_BASELINE, *FP32_OF.values()) if n in timed]
    others = [r for r in result.runners if r.name != "eager"]
    columns = {
        "compile s": {r.name: f"{r.compile_s:.1f}" for r in others},
        "max abs err": {r.name: f"{r.max_error:.1e}" for r in others},
        "rel L2 err": {r.name: f"{r.rel_error:.1e}" for r in others},
        "rounds": {r.name: str(len(r.samples_ms)) for r in result.runners},
        "note": {r.name: r.note for r in result.runners},
    }
    for col in columns["max abs err"], columns["rel L2 err"], columns["compile s"]:
        for name in [n for n, text in col.items() if text == "nan"]:
            col[name] = "-"
    head = f"### {result.model}\n\nmax |eager output| = {result.output_scale:.3g}"
    if anchor:
        head += f"; fastest anchor: {anchor}"
    if _has_int8(result):
        head += f"; fastest int8 anchor: {int8_anchor or 'none ran'}"
    if not math.isnan(result.stolen):
        head += f"; CPU time stolen by the hypervisor while timing: {result.stolen:.1%}"
        if stolen_suspect(result.stolen):
            head += " (**timings suspect**: another virtual machine's load slowed some calls)"
    return head + "\n\n" + format_timings(result.timings, ratios_to=ratios, columns=columns)


def format_summary(results: Sequence[ModelResult]) -> str:
    """One line per runner: speed vs eager on each model (higher is faster)."""
    names = [r.name for r in results[0].runners]
    lines = ["| runner | " + " | ".join(r.model for r in results) + " |"]
    lines.append("|---|" + "---:|" * len(results))
    for name in names:
        cells = []
        for res in results:
            ms = {t.name: t.median_ms for t in res.timings}
            ok = not (math.isnan(ms.get(name, math.nan)) or math.isnan(ms["eager"]))
            cells.append(f"{ms['eager'] / ms[name]:.2f}x" if ok else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_int8_summary(results: Sequence[ModelResult]) -> str:
    """One line per model and graphopt int8 runner: its speed against the fastest int8 anchor
    and against graphopt's fp32 through the same entry (`fp32_of`), with the runner's and the
    anchor's relative L2 errors ("" if no int8)."""
    subjects = [n for n in INT8_RUNNERS if n not in INT8_ANCHORS]
    lines = [
        "| model | runner | median ms | rel L2 err | fastest int8 anchor | anchor ms "
        "| anchor rel L2 err | speed vs fastest int8 anchor | graphopt fp32 | speed vs it |",
        "|---|---|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for res in results:
        ms = {t.name: t.median_ms for t in res.timings}
        errors = {r.name: r.rel_error for r in res.runners}
        anchor = res.int8_anchor()
        for name in (n for n in subjects if n in ms):
            cells = [res.model, name, _cell(ms[name], ".3f"), _cell(errors[name], ".1e")]
            cells += [anchor or "-", _cell(ms.get(anchor, math.nan), ".3f")]
            cells += [_cell(errors.get(anchor, math.nan), ".1e")]
            fp32 = fp32_of(name, [n for n, median in ms.items() if not math.isnan(median)])
            cells += [_speed(ms, anchor, name), fp32, _speed(ms, fp32, name)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def format_prune_summary(results: Sequence[ModelResult]) -> str:
    """One line per model and pruned runner: weights kept, speed against graphopt-cpu (the
    dense model through the same compiler) and against the fastest int8 anchor."""
    lines = [
        "| model | runner | median ms | conv/linear weights kept | speed vs "
        f"{FP32_BASELINE} | fastest int8 anchor | speed vs fastest int8 anchor |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for res in results:
        ms = {t.name: t.median_ms for t in res.timings}
        kept = {r.name: r.params_kept for r in res.runners}
        anchor = res.int8_anchor()
        for name in (n for n in PRUNED_RUNNERS if n in ms):
            cells = [res.model, name, _cell(ms[name], ".3f"), _cell(kept[name], ".1%")]
            cells += [_speed(ms, FP32_BASELINE, name), anchor or "-", _speed(ms, anchor, name)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _cell(x: float, fmt: str) -> str:
    return "-" if math.isnan(x) else format(x, fmt)


def _speed(ms: dict[str, float], base: str | None, name: str) -> str:
    """base's median / name's median as "1.23x", or "-"."""
    ratio = ms.get(base, math.nan) / ms[name] if base else math.nan
    return "-" if math.isnan(ratio) else f"{ratio:.2f}x"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_description(command: str, device: str = "cpu") -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("tvm", "onnxruntime", "onnx", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "not installed"
    versions["torchao"] = _version("torchao")  # not imported: it prints warnings when loaded
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    gpu = []
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        gpu = [
            f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA "
            f"{torch.version.cuda}; model and inputs on {device}"
        ]
    return "\n".join(
        [
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- command: `{command}`",
            f"- CPU: {cpu}, {cores} cores usable, torch threads {torch.get_num_threads()}",
            *gpu,
            f"- load average at start: {load}",
            "- " + ", ".join(f"{k} {v}" for k, v in versions.items()),
            "- batch 1, fp32 (int8 runners: post-training quantized from it), inference "
            "(`torch.no_grad()`)",
        ]
    )


def format_report(results: Sequence[ModelResult], machine: str, settings: str) -> str:
    parts = [
        "# graphopt benchmarks",
        machine,
        settings,
        "Ratios are what count; absolute times on shared machines are noise. "
        "`speed vs X` = X's median / this runner's median (above 1.00x: faster than X).",
        "## Speed vs eager",
        format_summary(results),
    ]
    int8 = format_int8_summary(results)
    if int8:
        parts += [
            "## int8: speed vs the fastest int8 anchor and vs graphopt fp32",
            f"int8 anchors: {', '.join(INT8_ANCHORS)}. int8 is lossy: `rel L2 err` = "
            "||out - eager|| / ||eager|| on the timed input; a few percent is expected, over "
            f"{INT8_REL_ERROR_TOLERANCE:.0%} the runner's note says SUSPECT.",
            int8,
        ]
    half = format_half_summary(results)
    if half:
        parts += [
            "## 16-bit: speed vs OpenVINO's runtime in its default precision",
            f"`{HALF_ANCHOR}`: OpenVINO's runtime on `ov.convert_model`, in the precision it "
            "picks for this CPU (bf16 where the CPU computes it natively); `openvino-f32` forced "
            "to f32. `top-1 = eager fp32`: argmax over the output's last dim (the class; for "
            f"BERT each token's hidden feature) equal to eager's on {CALIBRATION_BATCHES} other "
            "inputs drawn like the timed one.",
            half,
        ]
    pruned = format_prune_summary(results)
    if pruned:
        parts += [
            "## Structured pruning (50% of the channels, no fine-tuning)",
            "A pruned model computes other numbers than the dense one (its error against eager "
            "is large by design: `graphopt.recover` wins the accuracy back by distillation); "
            "what counts here is the weights it keeps and its speed.",
            pruned,
        ]
    parts += [format_model(r) for r in results]
    return "\n\n".join(parts) + "\n"


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; accepted: {', '.join(known)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--models", default=",".join(FULL), help=f"of {', '.join(MODELS)}")
    parser.add_argument("--runners", default=",".join(RUNNERS), help=f"of {', '.join(RUNNERS)}")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--budget-s", type=float, default=20.0, help="timing seconds per runner per model"
    )
    parser.add_argument(
        "--compile-budget-s", type=float, default=300.0, help="compile seconds per runner"
    )
    parser.add_argument("--out", default=None, help="default benchmarks/RESULTS.md (not --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 rounds, no file")
    parser.add_argument(
        "--device",
        default="cpu",
        help=f"cpu, or cuda[:N]: model and inputs on that GPU (runners: {', '.join(CUDA_RUNNERS)})",
    )
    args = parser.parse_args(argv)
    # Idle TVM worker threads spin by default and steal the cores of the runner timed after
    # them in interleaved rounds (as onnxruntime's do; see runners.onnxruntime_cpu). TVM reads
    # this when its thread pool starts, on the first TVM call.
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "benchmarks.run", *argv])
    if args.smoke:
        args.models = ",".join(TINY) if args.models == ",".join(FULL) else args.models
        args.rounds, args.warmup = min(args.rounds, 2), min(args.warmup, 1)
    out = args.out or (
        None if args.smoke else os.path.join(os.path.dirname(__file__), "RESULTS.md")
    )
    models = _names(args.models, list(MODELS), "models")
    runners = _names(args.runners, list(RUNNERS), "runners")
    if "eager" not in runners:
        runners.insert(0, "eager")
    if args.device != "cpu":
        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            raise SystemExit(
                f"--device {args.device!r}: accepted are cpu and cuda[:N] with a GPU torch sees "
                f"(torch.cuda.is_available() is {torch.cuda.is_available()})"
            )
        if args.runners == ",".join(RUNNERS):
            runners = list(CUDA_RUNNERS)
        elif cpu_only := [r for r in runners if r not in CUDA_RUNNERS]:
            raise SystemExit(
                f"--device {args.device}: runners {cpu_only} run on the CPU only; "
                f"accepted: {', '.join(CUDA_RUNNERS)}"
            )
    machine = machine_description(command, args.device)
    print(machine, flush=True)
    log: Log = lambda line: print(line, flush=True)  # noqa: E731
    results = run_suite(
        models,
        runners,
        rounds=args.rounds,
        warmup=args.warmup,
        budget_s=args.budget_s,
        compile_budget_s=args.compile_budget_s,
        device=args.device,
        log=log,
    )
    settings = (
        f"Settings: {args.rounds} interleaved rounds after {args.warmup} warm-up calls; a runner "
        f"whose single call would not fit {args.rounds + args.warmup} calls in {args.budget_s:g} s "
        f"gets fewer rounds (noted); compile budget {args.compile_budget_s:g} s per runner. "
        "`compile s` is building the runner plus its first call; on-disk caches (inductor's "
        "FX graph cache, graphopt's TVM cache) shorten it when warm. `max abs err` and `rel L2 "
        "err` (||out - eager|| / ||eager||) are against eager on the same input. int8 runners "
        f"calibrate on the same {CALIBRATION_BATCHES} batches, drawn like the input with other "
        "seeds; calibrating and quantizing count as compile time."
    )
    report = format_report(results, machine, settings)
    print("\n" + report, flush=True)
    if out:
        with open(out, "w") as f:
            f.write(report)
        print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
