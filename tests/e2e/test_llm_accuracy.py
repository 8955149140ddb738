"""What each mode for linear layers costs a language model trained on real text, in perplexity.

`examples/llm_quantize.py` trains a byte-level Llama on 22 standard-library modules (seeded:
the same weights every run); perplexity is measured on six other modules. The README's table
is the example's output.
"""

from __future__ import annotations

import pytest

from examples.llm_quantize import MODES, held_out_chunks, perplexity_table, train

# Largest perplexity increase over float32 each mode may cost (issue #28's goals).
LIMITS = {
    "int8_weight_only": 0.005,
    "int4_weight_only (group 128)": 0.05,
    "int8_dynamic": 0.02,
    "int8_dynamic + SmoothQuant 0.5": 0.02,
}


@pytest.fixture(scope="module")
def table():
    model = train(log=False)
    return perplexity_table(model, held_out_chunks(32))


def test_the_model_learned_the_text(table):
    # A byte-level model that learned nothing has a perplexity near the ~70 distinct bytes of
    # the text; this one predicts most bytes.
    assert table["float32 (eager)"] < 7.0


def test_graphopt_float32_is_eager(table):
    assert table["float32 (graphopt)"] == pytest.approx(table["float32 (eager)"], rel=1e-4)


@pytest.mark.parametrize("mode", list(MODES))
def test_quantized_perplexity_within_its_budget(table, mode):
    base = table["float32 (eager)"]
    assert table[mode] / base - 1 <= LIMITS[mode], f"{mode}: {table[mode]:.3f} vs {base:.3f}"
