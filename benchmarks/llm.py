"""Decoder LLM benchmark: `python -m benchmarks.llm` writes benchmarks/RESULTS-llm.md.

For a ~200M-parameter Llama-architecture model (hidden 1024, 12 layers, 16 heads, 4 KV heads,
vocab 32000; random weights from a transformers config) and a Qwen2-architecture one of the
same size, every runner compiles `model.forward` and runs `model.generate` (greedy, static KV
cache), side by side in interleaved rounds in one process:

  decode    tokens/s: (t(33 new tokens) - t(1 new token)) / 32, batch 1 and batch 8
  prefill   ms to the first token of a 128-token prompt
  limit     the machine's read bandwidth / the bytes of weights one decode step reads: the most
            tokens/s any runner could reach; each runner's share of its own limit
  memory    each runner again in a fresh process: peak RSS while building, compiling and
            generating, against eager's (`--memory` runs one; `--memory-models`, default llama)
  breakdown where a decode token's time goes (profiled): linear kernels, the rest of the
            compiled graphs, and outside them (generate loop, guards)
  kernels   every linear shape of the model at batch 1 through fp32 matmul and each weight-only
            kernel (int8 in both its layouts), GB/s of weights read from memory
            (`--kernels-only`: this table alone, to RESULTS-llm-kernels.md)

Runners: eager; inductor (freezing); torchao 0.18 weight-only int8 and int4 + inductor;
OpenVINO's torch.compile backend (if `openvino` imports); graphopt fp32 (`backend="graphopt"`)
and bf16 (`options={"dtype": "bfloat16"}`), and graphopt int8/int4 weight-only and int8_dynamic
(`graphopt.quantize_weights_` then `backend="graphopt"`);
llama.cpp through llama-cpp-python (if `llama_cpp` imports; `pip install .[bench]`) on a GGUF
that benchmarks/llama_cpp.py writes with the `gguf` package, f32 and llama.cpp's q8_0 / q4_0
quantizations, greedy decoding of token ids, batch 1 only (b8 is '-'). Run nothing else
meanwhile (2 cores: a second busy process makes every number wrong); the hypervisor's stolen
share is reported.

    python -m benchmarks.llm                       # everything, ~1 hour on 2 cores
    python -m benchmarks.llm --models llama --runners eager,graphopt-int8 --rounds 2
    python -m benchmarks.llm --kernels-only         # the kernel table, ~2 minutes
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphopt  # noqa: E402
from graphopt.bench import SETTLE_S, StolenTime  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 0
PROMPT = 16  # decode prompt length
NEW_TOKENS = 32
PREFILL = 128
CACHE_LEN = PREFILL + NEW_TOKENS + 8

SIZES = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def build(name: str) -> torch.nn.Module:
    import transformers

    config_name, model_name = MODELS[name]
    config = getattr(transformers, config_name)(**SIZES, tie_word_embeddings=False)
    torch.manual_seed(SEED)
    return getattr(transformers, model_name)(config).eval()


# ------------------------------------------------------------------------------------ runners


def _compile(model: torch.nn.Module, backend: Any, **kwargs: Any) -> torch.nn.Module:
    model.forward = torch.compile(model.forward, backend=backend, **kwargs)
    return model


def _inductor(model: torch.nn.Module) -> torch.nn.Module:
    return _compile(model, "inductor")


def _torchao(config: Callable[[], Any]) -> Callable[[torch.nn.Module], torch.nn.Module]:
    def setup(model: torch.nn.Module) -> torch.nn.Module:
        from torchao.quantization import quantize_

        quantize_(model, config())
        return _compile(model, "inductor")

    return setup


def _torchao_int8() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _torchao_int4() -> Any:
    from torchao.prototype.quantization.int4.inference_workflow import (
        PrototypeInt4WeightOnlyConfig,
    )

    return PrototypeInt4WeightOnlyConfig(group_size=128)


def _openvino(model: torch.nn.Module) -> torch.nn.Module:
    import openvino.torch  # noqa: F401 - registers backend="openvino"

    return _compile(model, "openvino")


def _graphopt(
    mode: str | None, dtype: str = "float32"
) -> Callable[[torch.nn.Module], torch.nn.Module]:
    def setup(model: torch.nn.Module) -> torch.nn.Module:
        if mode is not None:
            graphopt.quantize_weights_(model, mode, group_size=128)
        # Its matmuls read 16-bit copies of the weights (norm weights, a few KB, stay fp32).
        model.bench_bytes_per_weight_scale = 0.5 if dtype != "float32" else 1.0
        return _compile(model, "graphopt", options={"dtype": dtype})

    return setup


def _llama_cpp(outtype: str) -> Callable[[torch.nn.Module], Any]:
    def setup(model: torch.nn.Module) -> Any:
        from benchmarks.llama_cpp import LlamaCppRunner

        return LlamaCppRunner(model, outtype, n_ctx=CACHE_LEN)

    return setup


# setup(model) -> a model to generate() with, or an object with generate(ids, new),
# weight_bytes_per_token() and, if it only decodes batch 1, max_batch = 1 (llama.cpp).
RUNNERS: dict[str, Callable[[torch.nn.Module], Any]] = {
    "eager": lambda model: model,
    "inductor": _inductor,
    "torchao-int8+inductor": _torchao(_torchao_int8),
    "torchao-int4+inductor": _torchao(_torchao_int4),
    "openvino": _openvino,
    "graphopt": _graphopt(None),
    "graphopt-int8": _graphopt("int8_weight_only"),
    "graphopt-int4": _graphopt("int4_weight_only"),
    "graphopt-int8-dynamic": _graphopt("int8_dynamic"),  # for prefill (compute-bound)
    "graphopt-bf16": _graphopt(None, "bfloat16"),
    "llama.cpp-f32": _llama_cpp("f32"),
    "llama.cpp-q8_0": _llama_cpp("q8_0"),
    "llama.cpp-q4_0": _llama_cpp("q4_0"),
}
FP32 = ("eager", "inductor", "openvino", "graphopt", "llama.cpp-f32")
BREAKDOWN = ("inductor", "graphopt", "graphopt-int8", "graphopt-int4")  # where time goes


# ------------------------------------------------------------------------------ measurements


def generate(model: Any, ids: torch.Tensor, new: int) -> torch.Tensor:
    if not isinstance(model, torch.nn.Module):  # llama.cpp: its own greedy loop
        return model.generate(ids, new)
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        pad_token_id=0,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        cache_implementation="static",
        max_cache_len=CACHE_LEN,
    )


def weight_bytes_per_token(model: Any) -> int:
    """Bytes one decode step reads: every weight but the embedding table (one row of it)."""
    if not isinstance(model, torch.nn.Module):
        return model.weight_bytes_per_token()
    embedding = model.get_input_embeddings()  # graphopt's int8 table: buffers
    skip = {id(t) for t in (*embedding.parameters(), *embedding.buffers())}
    skip -= {
        id(t)
        for n, m in model.named_modules()
        if m is not embedding
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
    }  # tied: read
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in skip and t.dtype != torch.bool:
            if hasattr(t, "__tensor_flatten__"):  # torchao's tensor subclasses
                names, _ = t.__tensor_flatten__()
                total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
            else:
                total += t.numel() * t.element_size()
    return int(total * getattr(model, "bench_bytes_per_weight_scale", 1.0))


def bandwidth(megabytes: int = 512, rounds: int = 10) -> tuple[float, float]:
    """(read, copy) GB/s on a large tensor, medians of `rounds`: read = the bytes a sum reads
    per second (what a decode step does with the weights), copy = bytes read plus written."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    size = src.numel() * 4
    results = []
    for fn, moved in ((lambda: src.sum(), size), (lambda: dst.copy_(src), 2 * size)):
        fn()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        results.append(moved / statistics.median(times) / 1e9)
    return results[0], results[1]


@dataclass
class Row:
    runner: str
    compile_s: float = math.nan
    decode_ms: dict[int, list[float]] = field(default_factory=dict)  # batch -> ms per token
    prefill_ms: list[float] = field(default_factory=list)
    bytes_per_token: int = 0
    agrees: str = ""
    error: str = ""
    peak_mb: float = math.nan
    serving_mb: float = math.nan  # peak once the model is built (and quantized)
    note: str = ""


def _batches(model: Any, prompts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The prompts of the batch sizes `model` decodes (llama.cpp's runner: batch 1 only)."""
    return {b: ids for b, ids in prompts.items() if b <= getattr(model, "max_batch", b)}


def _timed(fn: Callable[[], Any]) -> float:
    time.sleep(SETTLE_S)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_model(name: str, runners: list[str], rounds: int, log: Callable[[str], None]) -> dict:
    torch._dynamo.config.recompile_limit = 256  # all runners' graphs of one forward
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch._inductor.config.freezing = True
    base = build(name)  # seeded: every build(name) has these weights
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(3, 32000, (b, PROMPT), generator=gen) for b in (1, 8)}
    long_prompt = torch.randint(3, 32000, (1, PREFILL), generator=gen)
    with torch.no_grad():
        expected = generate(base, prompts[1], NEW_TOKENS)
    del base
    rows: dict[str, Row] = {}
    models: dict[str, Any] = {}
    # Once, not per runner: a reset drops every compiled graph, the runners prepared before
    # included (they would all compile again while timed). Every runner's graphs hang on the
    # same code object (the model class's forward), told apart by their guards.
    torch._dynamo.reset()
    for runner in runners:
        row = rows[runner] = Row(runner)
        log(f"[{name}] preparing {runner}")
        try:
            model = build(name)
            start = time.perf_counter()
            model = RUNNERS[runner](model)
            with torch.no_grad():  # every call the timing makes, so that all graphs compile
                for ids in _batches(model, prompts).values():
                    generate(model, ids, 1)
                    generate(model, ids, NEW_TOKENS + 1)
                generate(model, long_prompt, 1)
                got = generate(model, prompts[1], NEW_TOKENS)
            row.compile_s = time.perf_counter() - start
            same = (got[0, PROMPT:] == expected[0, PROMPT:]).float().mean().item()
            row.agrees = f"{same:.0%}"
            row.bytes_per_token = weight_bytes_per_token(model)
            row.note = getattr(model, "note", "")
            models[runner] = model
        except Exception as err:  # a runner that fails is a row with the reason
            row.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
            log(f"[{name}] {runner} failed: {row.error}")
        gc.collect()
    order = list(models)
    shuffle = random.Random(0).shuffle
    counters = torch._dynamo.utils.counters
    compiled_before = counters["stats"]["unique_graphs"]
    with torch.no_grad(), StolenTime() as stolen:
        for r in range(rounds):
            shuffle(order)
            for runner in order:
                model, row = models[runner], rows[runner]
                for batch, ids in _batches(model, prompts).items():
                    one = _timed(functools.partial(generate, model, ids, 1))
                    many = _timed(functools.partial(generate, model, ids, NEW_TOKENS + 1))
                    row.decode_ms.setdefault(batch, []).append((many - one) * 1e3 / NEW_TOKENS)
                    log(f"[{name}] {runner} b{batch}: 1 token {one:.3f} s, "
                        f"{NEW_TOKENS + 1} tokens {many:.3f} s")  # fmt: skip
                prefill = _timed(functools.partial(generate, model, long_prompt, 1))
                row.prefill_ms.append(prefill * 1e3)
            log(f"[{name}] round {r + 1}/{rounds} done")
    recompiled = counters["stats"]["unique_graphs"] - compiled_before
    breakdown = {}
    for runner in [r for r in BREAKDOWN if r in models]:
        log(f"[{name}] where {runner}'s time goes")
        breakdown[runner] = time_breakdown(models[runner], prompts[1])
    return {
        "rows": rows, "stolen": stolen.share, "recompiled": recompiled, "breakdown": breakdown
    }  # fmt: skip


def _vm_hwm_mb() -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return math.nan


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux: clear_refs 5), after returning the
    freed heap to the OS."""
    from graphopt.compiler import _return_freed_memory

    gc.collect()
    _return_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_memory(name: str, runner: str) -> tuple[float, float]:
    """(peak MB of the whole run, peak MB once the model is built, and quantized for the
    graphopt-int runners) of building `name`, setting up `runner` and generating."""
    model = build(name)
    mode = {
        "graphopt-int8": "int8_weight_only",
        "graphopt-int4": "int4_weight_only",
        "graphopt-int8-dynamic": "int8_dynamic",
    }.get(runner)
    if mode is not None:
        graphopt.quantize_weights_(model, mode, group_size=128)
        runner = "graphopt"
    whole = _vm_hwm_mb()
    _reset_peak()
    model = RUNNERS[runner](model)
    ids = torch.randint(3, 32000, (1, PROMPT))
    with torch.no_grad():
        generate(model, ids, NEW_TOKENS)
    serving = _vm_hwm_mb()
    return max(whole, serving), serving


def peak_memory(name: str, runner: str) -> tuple[float, float]:
    """`measure_memory` in a fresh process (nan, nan if it fails)."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.llm", "--memory", name, runner],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    try:
        whole, serving = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return math.nan, math.nan
    return whole, serving


# ------------------------------------------------------------------------- where time goes


# The ops a compiled decode step runs its linear layers with: graphopt's quantized ones, and
# the matmuls of fp32 graphs (inductor with freezing prepacks weights for oneDNN or MKL).
LINEAR_OPS = (
    "graphopt::linear_", "aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "mkl::_mkl_linear"
)  # fmt: skip


def time_breakdown(model: Any, ids: torch.Tensor) -> dict[str, float]:
    """ms per decode token by where it is spent, from torch.profiler over a generate() of
    NEW_TOKENS + 1 tokens minus one of 1 token (the prefill cancels): the quantized linear
    kernels (graphopt's ops), the rest of the compiled graphs (attention, norms, RoPE, cache
    updates: inductor's code), and everything outside them (transformers' generate loop and
    sampling, dynamo's guards, Python). The profiler's own cost inflates "outside"."""
    from torch.profiler import ProfilerActivity, profile

    def spent(new: int) -> dict[str, float]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            generate(model, ids, new)
            wall = (time.perf_counter() - start) * 1e6
        compiled = kernels = 0.0
        for event in prof.key_averages():
            if event.key.startswith("Torch-Compiled Region"):
                compiled += event.cpu_time_total
            elif event.key.startswith(LINEAR_OPS):
                kernels += event.cpu_time_total
        return {"linear kernels": kernels, "rest of compiled graphs": compiled - kernels,
                "outside compiled graphs": wall - compiled, "total": wall}  # fmt: skip

    with torch.no_grad():
        generate(model, ids, NEW_TOKENS + 1)  # warm
        one, many = spent(1), spent(NEW_TOKENS + 1)
    return {key: (many[key] - one[key]) / NEW_TOKENS / 1e3 for key in many}


# ------------------------------------------------------------------------------------ kernels


# Each kernel is timed over distinct copies of its weight adding up to this many bytes, more
# than any CPU's last-level cache: every call reads its weight from memory, as a decode step
# (which reads each weight once per token) does. Timing one weight over and over would time
# the cache instead.
STREAM_BYTES = 160e6


def _time_streamed(fn: Callable[..., Any], args: Any, rounds: int) -> float:
    """Median us a call of fn over `args` (per-copy arguments), each copy called in turn."""
    for a in args:
        fn(*a)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for a in args:
            fn(*a)
        samples.append((time.perf_counter() - start) / len(args) * 1e6)
    return statistics.median(samples)


def kernel_table(name: str, rounds: int) -> str:
    """Every distinct linear shape of the model at batch 1: fp32 matmul and the weight-only
    kernels, each reading its weights from memory (`STREAM_BYTES`)."""
    from graphopt import quantized_linear

    quantized_linear.load_kernels()
    model = build(name)
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if type(m) is torch.nn.Linear})
    del model
    kinds = ["fp32 matmul", "graphopt int8", "graphopt int8 tiled", "torch int8pack",
             "graphopt int4", "torch int4pack"]  # fmt: skip
    lines = [
        "| weight [out, in] | " + " | ".join(f"{kind} us" for kind in kinds)
        + " | int8 GB/s | int8 tiled GB/s | int4 GB/s |",
        "|---|" + "---:|" * (len(kinds) + 3),
    ]  # fmt: skip
    ops = torch.ops.graphopt
    for n, k in shapes:
        w = torch.randn(n, k)
        x = torch.randn(1, k)
        q8, s8 = quantized_linear.quantize_int8(w)
        q4, s4, z4 = quantized_linear.quantize_int4(w, 128)
        tiles = quantized_linear.tile_int8(q8) if quantized_linear.tileable_int8(q8) else None
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (n, k), dtype=torch.int32), 1
            )
            sz = torch.randn(k // 128, n, 2)
        except (RuntimeError, AttributeError):
            packed = sz = None
        # kind -> (op, its arguments); the weight is argument 1, copied for each stream copy
        calls = {
            "fp32 matmul": (torch.mm, (x, w.t().contiguous())),
            "graphopt int8": (ops.linear_int8_weight, (x, q8, s8, None)),
            "graphopt int8 tiled": (ops.linear_int8_weight, (x, tiles, s8, None)),
            "torch int8pack": (torch._weight_int8pack_mm, (x, q8, s8)),
            "graphopt int4": (ops.linear_int4_weight, (x, q4, s4, z4, 128, None)),
            "torch int4pack": (torch.ops.aten._weight_int4pack_mm_for_cpu, (x, packed, 128, sz)),
        }
        if tiles is None:
            del calls["graphopt int8 tiled"]
        if packed is None:
            del calls["torch int4pack"]
        us = {}
        for kind, (fn, args) in calls.items():
            weight_bytes = args[1].numel() * args[1].element_size()
            count = math.ceil(STREAM_BYTES / weight_bytes)
            copies = [args] + [(args[0], args[1].clone(), *args[2:]) for _ in range(count - 1)]
            us[kind] = _time_streamed(fn, copies, rounds)
            del copies
            gc.collect()
        bytes8 = q8.numel() + 4 * s8.numel()
        gbs = [bytes8 / us["graphopt int8"], bytes8 / us.get("graphopt int8 tiled", math.nan)]
        gbs.append((q4.numel() + 4 * (s4.numel() + z4.numel())) / us["graphopt int4"])
        cells = [f"{us.get(kind, math.nan):.1f}" for kind in kinds]
        cells += [f"{value / 1e3:.1f}" for value in gbs]
        lines.append(f"| [{n}, {k}] | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ report


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def model_table(result: dict, bandwidth: float, eager_peak: float) -> str:
    rows: dict[str, Row] = result["rows"]
    fastest_fp32 = min(
        (_median(r.decode_ms.get(1, [])) for n, r in rows.items() if n in FP32 and r.decode_ms),
        default=math.nan,
    )
    header = (
        "| runner | decode tok/s b1 | b8 | vs fastest fp32 (b1) | share of its bandwidth limit"
        " | prefill 128 ms | weights read/token MB | peak MB (eager's) | peak after build MB"
        " | tokens = eager | compile s | note |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows.values():
        if row.error:
            lines.append(f"| {row.runner} |" + " - |" * 10 + f" {row.error} |")
            continue
        b1, b8 = _median(row.decode_ms.get(1, [])), _median(row.decode_ms.get(8, []))
        tps1 = 1e3 / b1
        tps8 = "-" if math.isnan(b8) else f"{8e3 / b8:.1f}"  # llama.cpp: batch 1 only
        limit = bandwidth * 1e9 / row.bytes_per_token
        peak = f"{row.peak_mb:.0f} ({eager_peak:.0f})" if not math.isnan(row.peak_mb) else "-"
        lines.append(
            f"| {row.runner} | {tps1:.1f} | {tps8} | {fastest_fp32 / b1:.2f}x "
            f"| {tps1 / limit:.0%} of {limit:.0f} | {_median(row.prefill_ms):.0f} "
            f"| {row.bytes_per_token / 1e6:.0f} | {peak} | {row.serving_mb:.0f} | {row.agrees} "
            f"| {row.compile_s:.0f} | {row.note} |"
        )
    return "\n".join(lines)


def decode_chart(name: str, result: dict) -> str:
    """The batch-1 decode speed of every runner that ran, as an SVG bar chart."""
    from benchmarks.chart import bar_svg

    bars = [
        (row.runner, round(1e3 / _median(row.decode_ms.get(1, [])), 1))
        for row in result["rows"].values()
        if not row.error and row.decode_ms.get(1)
    ]
    return bar_svg(f"{name} decode, batch 1", bars, "tokens/s", note="benchmarks/llm.py")


def breakdown_table(breakdown: dict[str, dict[str, float]]) -> str:
    keys = ["total", "linear kernels", "rest of compiled graphs", "outside compiled graphs"]
    lines = ["| runner (batch 1, profiled) | " + " | ".join(f"{k} ms" for k in keys) + " |"]
    lines.append("|---|" + "---:|" * len(keys))
    for runner, ms in breakdown.items():
        cells = [f"{ms[keys[0]]:.2f}"]
        cells += [f"{ms[k]:.2f} ({ms[k] / ms['total']:.0%})" for k in keys[1:]]
        lines.append(f"| {runner} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runners", default=",".join(RUNNERS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process peaks")
    parser.add_argument(
        "--memory-models", default="llama", help="models whose per-process peaks are measured"
    )
    parser.add_argument(
        "--memory-runners", default=None, help="runners whose per-process peaks are measured "
        "(default: all that ran)"
    )  # fmt: skip
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    parser.add_argument(
        "--kernels-only", action="store_true",
        help="only the kernel table, written to benchmarks/RESULTS-llm-kernels.md",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-llm.md")
    parser.add_argument("--memory", nargs=2, metavar=("MODEL", "RUNNER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory:
        torch._inductor.config.freezing = True
        print(json.dumps(measure_memory(*args.memory)))
        return 0
    models, runners = args.models.split(","), args.runners.split(",")
    if args.kernels_only:
        return write_kernel_table(models[0], args.rounds, argv)
    unknown = sorted(set(runners) - set(RUNNERS)) + sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown {unknown}; runners: {list(RUNNERS)}, models: {list(MODELS)}")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    sections = [
        *_header("Decoder LLMs: decode, prefill, memory (`benchmarks/llm.py`)", argv),
        "Model sizes: " + json.dumps(SIZES) + ". Greedy `generate()` with a static cache "
        f"(max_cache_len {CACHE_LEN}); decode = (t({NEW_TOKENS + 1} new) - t(1 new)) / "
        f"{NEW_TOKENS} from a {PROMPT}-token prompt; prefill = time to the first token of a "
        f"{PREFILL}-token prompt; medians of {args.rounds} interleaved rounds. llama.cpp "
        "rows: the model written to a GGUF by benchmarks/llama_cpp.py (`gguf` package, "
        "placeholder vocabulary; f32, and q8_0 / q4_0 by llama.cpp's own quantizer with its "
        "default mix of tensor types, listed in the note), run by llama-cpp-python (built from "
        "source with -march=native) with greedy argmax over `Llama.eval` of token ids; batch 1 "
        "only, as its `Llama` decodes one sequence; compile s = writing, quantizing and loading "
        "the file.",
        "",
    ]
    read, copied = bandwidth()
    sections.append(
        f"Memory bandwidth: {read:.1f} GB/s read (a sum over a 512 MB tensor), {copied:.1f} "
        "GB/s copied (read + written). A runner's bandwidth limit is the read bandwidth over "
        "the bytes of weights one decode step reads.\n"
    )
    for name in models:
        result = run_model(name, runners, args.rounds, log)
        peaks = {}
        if not args.no_memory and name in args.memory_models.split(","):
            measured = args.memory_runners.split(",") if args.memory_runners else runners
            for runner in [r for r in runners if r in measured]:
                if not result["rows"][runner].error:
                    log(f"[{name}] peak memory of {runner}")
                    whole, serving = peak_memory(name, runner)
                    peaks[runner] = whole
                    result["rows"][runner].peak_mb = whole
                    result["rows"][runner].serving_mb = serving
        eager_peak = peaks.get("eager", math.nan)
        stolen = result["stolen"]
        sections += [
            f"## {name}",
            "",
            model_table(result, read, eager_peak),
            "",
            f"Hypervisor's stolen share while timing: {stolen:.1%}"
            + (" (suspect)" if stolen >= 0.02 else "")
            + f". Graphs compiled while timing: {result['recompiled']}"
            + (" (timings include compiles: suspect)" if result["recompiled"] else "."),
            "",
        ]
        if result["breakdown"]:
            sections += [
                "Where a decode token's time goes (ms per token, `time_breakdown`: "
                'torch.profiler, whose own cost lands in "outside"; linear kernels: '
                "graphopt's quantized ops, or ATen's/oneDNN's matmuls in fp32):",
                "",
                breakdown_table(result["breakdown"]),
                "",
            ]
        args.out.write_text("\n".join(sections))  # what is measured survives a later failure
        chart = args.out.with_name(f"{args.out.stem}-{name}-decode.svg")
        chart.write_text(decode_chart(name, result))
        gc.collect()
    if not args.no_kernels:
        log("kernels")
        sections += [
            "## Kernels at batch 1 (llama's linear shapes)",
            "",
            kernel_table(models[0], rounds=max(5, args.rounds * 3)),
            "",
        ]
    args.out.write_text("\n".join(sections))
    print("\n".join(sections))
    return 0


def _header(title: str, argv: list[str] | None) -> list[str]:
    """A RESULTS file's title, the command that wrote it, and the host."""
    command = "python -m benchmarks.llm " + " ".join(argv if argv is not None else sys.argv[1:])
    return [
        f"# {title}",
        "",
        f"Command: `{command.strip()}`  ",
        f"Date: {datetime.date.today()}, host: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
    ]


def write_kernel_table(model: str, rounds: int, argv: list[str] | None) -> int:
    text = "\n".join([
        *_header("Weight-only kernels at batch 1 (`benchmarks/llm.py --kernels-only`)", argv),
        f"Every distinct linear shape of {model}, x of one row. Each kernel is timed over copies "
        f"of its weight adding up to {STREAM_BYTES / 1e6:.0f} MB, so every call reads its weight "
        "from memory as a decode step does; medians of "
        f"{max(5, rounds * 3)} passes. GB/s: bytes of weights and scales read per second.",
        "",
        f"Memory bandwidth: {bandwidth()[0]:.1f} GB/s read (a sum over a 512 MB tensor).",
        "",
        kernel_table(model, rounds=max(5, rounds * 3)),
        "",
    ])  # fmt: skip
    (HERE / "RESULTS-llm-kernels.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
