"""Quantized LLM layers on a language model trained on real text: what each mode costs.

Trains a small byte-level Llama (transformers config, 4 layers, hidden 128) on Python's own
standard-library sources, then measures perplexity on other standard-library modules it never
saw: in float32, and with each of graphopt's modes for linear layers (weight-only int8 and
int4, dynamic int8 with and without SmoothQuant). Ends by generating a few lines through
`torch.compile(model.forward, backend="graphopt")` from the int8 model.

    python examples/llm_quantize.py                  # ~3 min on 2 cores
    python examples/llm_quantize.py --steps 1500 --generate 200
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch

import graphopt

SEQ = 128
STEPS = 800
# (row name, graphopt options): every mode for linear layers
MODES = {
    "int8_weight_only": {"quantize": "int8_weight_only"},
    "int4_weight_only (group 128)": {"quantize": "int4_weight_only", "group_size": 128},
    "int8_dynamic": {"quantize": "int8_dynamic"},
    "int8_dynamic + SmoothQuant 0.5": {"quantize": "int8_dynamic", "smoothquant": 0.5},
}
# Modules to train on and to measure on: disjoint, fixed, in every CPython 3.10+.
TRAIN_MODULES = (
    "argparse", "collections/__init__", "dataclasses", "enum", "functools", "inspect",
    "logging/__init__", "pathlib", "subprocess", "textwrap", "threading", "typing", "shutil",
    "tempfile", "pprint", "string", "heapq", "bisect", "copy", "abc", "contextlib", "fractions",
)  # fmt: skip
HELD_OUT_MODULES = ("random", "calendar", "difflib", "fnmatch", "glob", "statistics")


def stdlib_bytes(modules: tuple[str, ...]) -> torch.Tensor:
    """The UTF-8 bytes of these standard-library modules, concatenated, as a uint8 tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((root / f"{name}.py").read_bytes() for name in modules)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def make_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def train(steps: int = STEPS, batch: int = 16, log: bool = True) -> torch.nn.Module:
    """A byte-level Llama trained on TRAIN_MODULES (seeded: the same weights every run)."""
    data = stdlib_bytes(TRAIN_MODULES)
    model = make_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        at = torch.randint(0, len(data) - SEQ - 1, (batch,), generator=generator)
        ids = torch.stack([data[i : i + SEQ] for i in at.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step + 1) % 100 == 0:
            print(f"step {step + 1}/{steps}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    return model.eval()


def held_out_chunks(count: int = 48) -> torch.Tensor:
    """`count` evenly spaced SEQ-byte windows of HELD_OUT_MODULES, as [count, SEQ] ids."""
    data = stdlib_bytes(HELD_OUT_MODULES)
    starts = torch.linspace(0, len(data) - SEQ - 1, count).long()
    return torch.stack([data[i : i + SEQ] for i in starts.tolist()])


def perplexity(model: torch.nn.Module, chunks: torch.Tensor) -> float:
    """exp(mean next-byte cross-entropy) over the chunks, one chunk (batch 1) per call."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in chunks:
            logits = model(ids[None]).logits
            loss = torch.nn.functional.cross_entropy(
                logits[0, :-1].float(), ids[1:], reduction="sum"
            )
            total, count = total + loss.item(), count + len(ids) - 1
    return math.exp(total / count)


def calibration_batches(count: int = 4) -> list[tuple[torch.Tensor]]:
    """SmoothQuant's calibration data: windows of the training text, one per batch."""
    data = stdlib_bytes(TRAIN_MODULES)
    starts = torch.linspace(0, len(data) - SEQ - 1, count).long()
    return [(data[i : i + SEQ][None],) for i in starts.tolist()]


def perplexity_table(model: torch.nn.Module, chunks: torch.Tensor) -> dict[str, float]:
    """Perplexity in float32 (eager and through graphopt) and with each of MODES."""
    example = (chunks[0][None],)
    result = {"float32 (eager)": perplexity(model, chunks)}
    result["float32 (graphopt)"] = perplexity(graphopt.optimize(model, example), chunks)
    for name, options in MODES.items():
        if "smoothquant" in options:
            options = {**options, "calibration": calibration_batches()}
        result[name] = perplexity(graphopt.optimize(model, example, **options), chunks)
    return result


def format_table(result: dict[str, float]) -> str:
    base = result["float32 (eager)"]
    lines = ["| weights | perplexity | vs float32 |", "|---|---:|---:|"]
    for name, value in result.items():
        lines.append(f"| {name} | {value:.3f} | {value / base - 1:+.2%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps")
    parser.add_argument("--generate", type=int, default=120, help="bytes to generate at the end")
    args = parser.parse_args()
    model = train(args.steps)
    chunks = held_out_chunks()
    print(f"\nperplexity per byte on {len(chunks)} windows of {', '.join(HELD_OUT_MODULES)}:")
    print(format_table(perplexity_table(model, chunks)))

    summary = graphopt.quantize_weights_(model, "int8_weight_only")
    print(f"\n{summary}")
    model.config.use_cache = True
    model.forward = torch.compile(model.forward, backend="graphopt")
    prompt = torch.tensor([list(b"def ")])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=args.generate, do_sample=False)
    print("\ngenerated (greedy, int8 weights, graphopt):")
    print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
