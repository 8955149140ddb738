import torch
from torch import nn

from graphopt.passes.fold_constants import fold_constants
from graphopt.passes.unbatch_shared_matmuls import unbatch_shared_matmuls
from tests.passes.conftest import CFG, assert_matches_eager, assert_noop, batch_dim, capture, ops

aten = torch.ops.aten


class TransposedLinear(nn.Module):
    """A Linear on a transposed (non-contiguous) 3-d input: an attention output projection.
    (Its weight is larger than fold_constants' SMALL_NUMEL, which would otherwise fold the
    expanded weight into a constant.)"""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 80, bias=False)

    def forward(self, x):
        return self.proj(x.transpose(0, 1))


def _folded(model, *inputs, **kwargs):
    gm, example = capture(model, *inputs, **kwargs)
    return fold_constants(gm, CFG).gm, example


def test_bmm_by_an_expanded_weight_becomes_mm():
    model = TransposedLinear()
    gm, inputs = _folded(model, torch.randn(5, 3, 64))
    assert ops(gm)[aten.bmm.default] == 1

    result = unbatch_shared_matmuls(gm, CFG)

    assert result.modified and result.stats == {"unbatched": 1}
    assert ops(gm)[aten.bmm.default] == 0 and ops(gm)[aten.mm.default] == 1
    assert_matches_eager(model, gm, *inputs)


def test_symbolic_batch():
    model = TransposedLinear()
    gm, _ = _folded(model, torch.randn(5, 3, 64), dynamic_shapes=({1: batch_dim()[0][0]},))
    unbatch_shared_matmuls(gm, CFG)
    assert ops(gm)[aten.mm.default] == 1
    for batch in (2, 7):
        assert_matches_eager(model, gm, torch.randn(5, batch, 64))


class Attention(nn.Module):
    def forward(self, q, k):
        return q @ k.transpose(1, 2)  # bmm of two activations: not a layer


def test_bmm_of_activations_is_left_alone():
    gm, _ = capture(Attention(), torch.randn(2, 3, 4), torch.randn(2, 5, 4))
    assert_noop(unbatch_shared_matmuls, gm)
