"""The capture's decomposition tables (each target's `Backend.decompositions`): right beneath
autograd in training, core ATen otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import aot_function, nop
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt import targets
from graphopt.testing import assert_same_outputs

aten = torch.ops.aten
FLASH = aten._scaled_dot_product_flash_attention_for_cpu.default


def _table(target: str, training: bool) -> dict:
    return targets.backend(target).decompositions(training)


def _attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("target", ["cpu", "llvm"])
def test_training_table_gives_eager_attention_gradients(target):
    """torch's core-ATen table returns the attention probabilities as the fused CPU attention's
    logsumexp; its backward reads them and every gradient is wrong (by ~100 here)."""
    q, k, v = (torch.randn(2, 4, 8, 16, requires_grad=True) for _ in range(3))
    expected = torch.autograd.grad(_attention(q, k, v).square().sum(), (q, k, v))
    traced = aot_function(_attention, nop, nop, decompositions=_table(target, True))
    got = torch.autograd.grad(traced(q, k, v).square().sum(), (q, k, v))
    assert_same_outputs(expected, got)


def test_core_table_is_the_bug_the_training_table_avoids():
    """Documents torch 2.13's bug: if this starts passing, torch fixed it (see the note in
    graphopt/backends/base.py) and the training table may keep the decomposition."""
    from torch._decomp import core_aten_decompositions

    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    _, logsumexp = core_aten_decompositions()[FLASH](q, k, v)
    assert logsumexp.shape != FLASH(q, k, v)[1].shape


def test_inference_table_decomposes_attention_to_core_aten():
    """Inference keeps the decomposition: TVM, HLS and ONNX lower the matmuls and softmax."""
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    with torch.no_grad():
        gm = make_fx(_attention, _table("llvm", training=False))(q, k, v)
    targets = {node.target for node in gm.graph.nodes if node.op == "call_function"}
    assert FLASH not in targets and aten.bmm.default in targets
    assert_same_outputs(_attention(q, k, v), gm(q, k, v))


def test_frozen_weights_are_shared_only_where_updates_are_detected():
    """torch.compile's graphs keep the caller's weights (a version check on every call
    compiles anew after an in-place update); export's are a snapshot; inference tensors,
    which carry no version counter, are copied either way."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphopt.capture import freeze_placeholders
    from graphopt.passes.base import get_attr_value

    def frozen(weight, **kwargs):
        gm = make_fx(lambda x, w: x @ w)(torch.randn(2, 3), torch.randn(3, 4))
        freeze_placeholders(gm, {1: weight}, **kwargs)
        (node,) = gm.graph.find_nodes(op="get_attr")
        return get_attr_value(gm, node)

    weight = torch.randn(3, 4)
    assert frozen(weight, share=True).untyped_storage().data_ptr() == weight.data_ptr()
    assert frozen(weight).untyped_storage().data_ptr() != weight.data_ptr()
    with torch.inference_mode():
        inference = torch.randn(3, 4)
    copy = frozen(inference, share=True)
    assert copy.untyped_storage().data_ptr() != inference.data_ptr()
    assert torch.equal(copy, inference)
