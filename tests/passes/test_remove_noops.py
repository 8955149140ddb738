import operator

import torch
from torch import nn

from graphopt.passes.remove_noops import remove_noops
from tests.passes.conftest import CFG, assert_matches_eager, assert_noop, batch_dim, capture, ops

aten = torch.ops.aten


class Identities(nn.Module):
    def forward(self, x):
        y = (x.clone() * 1 + 0).view(x.shape).expand(4, 6).permute(0, 1).to(torch.float32)
        y = torch.ops.aten.native_dropout.default(y / 1 - 0, 0.5, False)[0]
        return torch.relu(y)


def test_removes_identity_ops():
    model, x = Identities(), torch.randn(4, 6)
    gm, inputs = capture(model, x)
    before = ops(gm)
    noops = [
        aten.clone.default,
        aten.mul.Tensor,
        aten.add.Tensor,
        aten.view.default,
        aten.expand.default,
        aten.permute.default,
        aten.native_dropout.default,
        aten.div.Tensor,
        aten.sub.Tensor,
    ]
    assert all(before[op] for op in noops), before

    result = remove_noops(gm, CFG)

    assert result.modified
    after = ops(gm)
    assert not any(after[op] for op in noops + [operator.getitem]), after
    assert after[aten.relu.default] == 1
    assert result.stats["removed"] == sum(before[op] for op in noops)  # dropout+getitem: one
    assert result.stats["removed_native_dropout"] == 1
    assert_matches_eager(model, gm, *inputs)


class LayoutChanges(nn.Module):
    def forward(self, x):
        flat = x.permute(1, 0).contiguous().view(-1)  # the clone makes the view valid
        return flat * 2, x.to(torch.float64) + 1, (x > 0).to(torch.int64) * 1.0


def test_keeps_ops_that_change_layout_or_dtype():
    model, x = LayoutChanges(), torch.randn(4, 6)
    gm, inputs = capture(model, x)
    before = ops(gm)
    assert before[aten.clone.default] == 1 and before[aten._to_copy.default] == 2

    assert_noop(remove_noops, gm)
    assert_matches_eager(model, gm, *inputs)


class ReturnsCopies(nn.Module):
    def forward(self, x):
        y = x * 2
        return x.clone(), y, y.clone(), x + 0


def test_keeps_returned_copies_that_would_alias():
    model, x = ReturnsCopies(), torch.randn(3, 5)
    gm, inputs = capture(model, x)
    assert ops(gm)[aten.clone.default] == 2

    assert_noop(remove_noops, gm)
    out = gm(*inputs)
    assert out[0] is not inputs[0] and out[2] is not out[1] and out[3] is not inputs[0]
    assert_matches_eager(model, gm, *inputs)


def test_no_noops_leaves_graph_unchanged():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    gm, _ = capture(model, torch.randn(2, 6))
    assert_noop(remove_noops, gm)


class SymbolicBatch(nn.Module):
    def forward(self, x):
        return torch.relu(x.clone().view(x.shape[0], 6) * 1).reshape(x.shape[0], 2, 3)


def test_symbolic_batch():
    model = SymbolicBatch()
    gm, _ = capture(model, torch.randn(4, 6), dynamic_shapes=batch_dim())
    assert isinstance(gm.graph.find_nodes(op="placeholder")[0].meta["val"].shape[0], torch.SymInt)

    result = remove_noops(gm, CFG)

    assert result.modified
    after = ops(gm)
    assert not after[aten.clone.default] and not after[aten.mul.Tensor], after
    assert after[aten.view.default] == 1  # the real reshape to (B, 2, 3) stays
    for batch in (2, 7):
        assert_matches_eager(model, gm, torch.randn(batch, 6))
