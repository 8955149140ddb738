"""Decoder LLMs from transformers configs through graphopt: capture, generate, compile counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import graphopt
from graphopt.backend import graphopt_backend
from tests.models import DECODERS, tiny_decoder


def _counting(backend: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    """A dynamo backend that counts the graphs it compiles, then hands them to `backend`."""
    count = [0]

    def compile_counted(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        count[0] += 1
        return backend(gm, example_inputs)

    return compile_counted, count


def _generate(model, prompts, backend=None, **kwargs) -> tuple[list[torch.Tensor], int]:
    """Greedy tokens for each prompt, with model.forward compiled by `backend` (None: eager),
    and how many graphs it compiled."""
    forward, count = model.forward, [0]
    if backend is not None:
        torch._dynamo.reset()
        backend, count = _counting(backend)
        model.forward = torch.compile(forward, backend=backend)
    try:
        with torch.no_grad():
            out = [model.generate(p, do_sample=False, **kwargs) for p in prompts]
    finally:
        model.forward = forward
    return out, count[0]


@pytest.mark.parametrize("arch", list(DECODERS))
def test_generate_with_the_dynamic_cache_matches_eager(arch):
    """transformers' default cache builds tensors in the forward: real constants of the graph
    that graphopt failed to copy inside the fake mode, on every decoder."""
    model = tiny_decoder(arch)
    prompts = [torch.randint(1, 128, (1, 7))]
    expected, _ = _generate(model, prompts, max_new_tokens=8)
    got, graphs = _generate(model, prompts, graphopt_backend, max_new_tokens=8)
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    assert graphs <= 3  # prefill, then a decode step (static, then with a dynamic length)
    assert not [f for r in graphopt.reports() for f in r.fallbacks]


def test_generate_with_the_static_cache_compiles_no_more_than_inductor():
    """cache_implementation="static" keeps one cache shape: prompts of other lengths and 256
    new tokens compile as few graphs through graphopt as through inductor."""
    from torch._inductor.compile_fx import compile_fx

    model = tiny_decoder("llama")
    prompts = [torch.randint(1, 128, (1, n)) for n in (5, 11)]
    kwargs = dict(max_new_tokens=256, cache_implementation="static", max_cache_len=280)
    expected, _ = _generate(model, prompts, **kwargs)
    with_inductor, inductor_graphs = _generate(model, prompts, compile_fx, **kwargs)
    got, graphs = _generate(model, prompts, graphopt_backend, **kwargs)
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    assert all(torch.equal(e, g) for e, g in zip(expected, with_inductor))
    assert graphs <= inductor_graphs, (graphs, inductor_graphs)


@pytest.mark.parametrize("entry", ["optimize", "export"])
def test_capturing_a_decoder_with_its_cache_says_what_to_pass(entry, tmp_path):
    model = tiny_decoder("qwen2")
    ids = torch.randint(1, 128, (1, 6))
    with pytest.raises(ValueError, match=r"DynamicCache.*model\.config\.use_cache = False"):
        if entry == "optimize":
            graphopt.optimize(model, (ids,))
        else:
            graphopt.export(model, (ids,), tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists()
    model.config.use_cache = False
    optimized = graphopt.optimize(model, (ids,))
    with torch.no_grad():
        torch.testing.assert_close(optimized(ids).logits, model(ids).logits)


def test_generate_in_bfloat16_with_the_static_cache(monkeypatch):
    """dtype="bfloat16" on a decoder: the matmuls run in bf16, the KV cache writes, softmax and
    RMSNorm as traced (fp32); logits stay close to eager's and as many graphs compile as in
    fp32. (The pass runs whatever this CPU has: emulated bf16 computes the same numbers.)"""
    import functools

    from graphopt.passes import cast_precision

    monkeypatch.setattr(cast_precision, "native", lambda dtype: True)
    model = tiny_decoder("llama")
    prompt = torch.randint(1, 128, (1, 9))
    kwargs = dict(
        max_new_tokens=12, cache_implementation="static", max_cache_len=32,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    (expected,), _ = _generate(model, [prompt], **kwargs)
    graphopt.clear_reports()
    (fp32,), fp32_graphs = _generate(model, [prompt], graphopt_backend, **kwargs)
    bf16_backend = functools.partial(graphopt_backend, options={"dtype": "bfloat16"})
    graphopt.clear_reports()
    (got,), graphs = _generate(model, [prompt], bf16_backend, **kwargs)
    assert graphs == fp32_graphs
    reports = graphopt.reports()
    assert reports and all(r.precision is not None and r.precision.applied for r in reports)
    assert all(r.precision.low_ops.get("mm", 0) >= 14 for r in reports)  # 7 per layer, 2 layers
    # Greedy tokens may part where two logits are within bf16's rounding; the first step's
    # logits (the prompt, before any token differs) are compared.
    first_expected, first_got = expected.logits[0], got.logits[0]
    assert 0 < graphopt.testing.relative_error(first_expected, first_got) < 2e-2
