import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from graphopt.passes.base import fake_mode_of, get_attr_value
from graphopt.passes.fold_constants import SMALL_NUMEL, fold_constants
from tests.passes.conftest import CFG, assert_matches_eager, assert_noop, batch_dim, capture, ops

aten = torch.ops.aten


class WeightArithmetic(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 8))
        self.b = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return x @ (self.w * 2 + 1).t() + self.b.neg()


def test_folds_weight_arithmetic():
    model = WeightArithmetic()
    gm, inputs = capture(model, torch.randn(3, 8))
    before = ops(gm)
    assert before[aten.permute.default] and before[aten.mul.Tensor] and before[aten.neg.default]

    result = fold_constants(gm, CFG)

    assert result.modified
    after = ops(gm)
    assert not any(after[op] for op in (aten.permute.default, aten.mul.Tensor, aten.neg.default))
    assert after[aten.mm.default] == 1 and after[aten.add.Tensor] == 1  # x @ W' + b'
    assert result.stats["folded"] == before.total() - after.total()
    assert result.stats["new_constants"] == 2
    assert result.stats["removed_constants"] == 2  # w and b are no longer read
    assert not hasattr(gm, "_graphopt_p_w")
    for node in gm.graph.find_nodes(op="get_attr"):
        assert isinstance(node.meta["val"], FakeTensor)
        assert node.meta["val"].shape == getattr(gm, node.target).shape
    assert_matches_eager(model, gm, *inputs)


class Random(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        noise = torch.rand(4) * self.w  # constant inputs only, but random: must stay
        return x + noise


def test_keeps_random_ops():
    gm, _ = capture(Random(), torch.randn(2, 4))
    random_ops = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())
    ]
    assert random_ops
    fold_constants(gm, CFG)
    assert set(random_ops) <= set(gm.graph.nodes)
    assert ops(gm)[aten.mul.Tensor] == 1  # depends on the random op, so not folded either
    assert not torch.equal(gm(torch.zeros(2, 4))[0], gm(torch.zeros(2, 4))[0])


class Broadcasts(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.randn(1, 1))

    def forward(self, x):
        big = self.s.expand(128, 128)  # 16384 elements from 1: stays computed
        return x + big, x.sum() + big.sum(0)  # the sum is small again: folded


def test_does_not_materialize_large_broadcasts():
    model = Broadcasts()
    gm, inputs = capture(model, torch.randn(128, 128))
    assert 128 * 128 > SMALL_NUMEL and ops(gm)[aten.sum.dim_IntList] == 2

    result = fold_constants(gm, CFG)

    assert result.modified
    after = ops(gm)
    assert after[aten.expand.default] == 1 and after[aten.sum.dim_IntList] == 1  # x.sum()
    assert all(
        getattr(gm, n.target).numel() <= SMALL_NUMEL for n in gm.graph.find_nodes(op="get_attr")
    )
    assert_matches_eager(model, gm, *inputs)


class ReturnsConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x + 1, self.w * 2


def test_returned_value_stays_computed():
    model = ReturnsConstant()
    gm, inputs = capture(model, torch.randn(3))
    assert_noop(fold_constants, gm)  # w * 2 is returned: folding would return our buffer
    out = gm(*inputs)[1]
    out.add_(100)  # the caller owns the result
    assert_matches_eager(model, gm, *inputs)


def test_runs_inside_an_active_fake_mode():
    model = WeightArithmetic()
    gm, inputs = capture(model, torch.randn(3, 8))
    with fake_mode_of(gm):  # torch.compile calls the backend inside the graph's fake mode
        result = fold_constants(gm, CFG)
    assert result.modified
    assert not any(isinstance(b, FakeTensor) for b in gm.buffers())
    assert_matches_eager(model, gm, *inputs)


def test_nothing_constant_leaves_graph_unchanged():
    model = nn.ReLU()
    gm, _ = capture(model, torch.randn(2, 3))
    assert_noop(fold_constants, gm)


def test_symbolic_batch():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    gm, _ = capture(model, torch.randn(4, 8), dynamic_shapes=batch_dim())
    assert ops(gm)[aten.permute.default] == 2

    result = fold_constants(gm, CFG)

    assert result.modified and ops(gm)[aten.permute.default] == 0
    for batch in (2, 9):
        assert_matches_eager(model, gm, torch.randn(batch, 8))


def test_a_folded_view_of_a_weight_shares_its_memory():
    """x @ w.t(): the transposed weight stays a view of w, not a copy (a copy held every
    weight twice while the backend packed it)."""

    class Linearish(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 8))

        def forward(self, x):
            return x @ self.w.t()

    model = Linearish()
    gm, inputs = capture(model, torch.randn(3, 8))
    (weight,) = (get_attr_value(gm, n) for n in gm.graph.find_nodes(op="get_attr"))
    fold_constants(gm, CFG)
    (mm,) = (n for n in gm.graph.nodes if n.target == aten.mm.default)
    folded = get_attr_value(gm, mm.args[1])
    assert folded.shape == (8, 5)
    assert folded.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    assert_matches_eager(model, gm, *inputs)
