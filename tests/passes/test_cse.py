import torch
from torch import nn

from graphopt.passes.base import fake_mode_of
from graphopt.passes.cse import eliminate_common_subexpressions as cse
from tests.passes.conftest import CFG, assert_matches_eager, assert_noop, batch_dim, capture, ops

aten = torch.ops.aten


class Duplicates(nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2 + torch.relu(x) * 2


def test_merges_identical_expressions():
    model = Duplicates()
    gm, inputs = capture(model, torch.randn(3, 4))
    assert ops(gm)[aten.relu.default] == 2 and ops(gm)[aten.mul.Tensor] == 2

    result = cse(gm, CFG)

    assert result.modified and result.stats == {"merged": 2, "merged_constants": 0}
    assert ops(gm)[aten.relu.default] == 1 and ops(gm)[aten.mul.Tensor] == 1
    assert_matches_eager(model, gm, *inputs)


class RandomTwice(nn.Module):
    def forward(self, x):
        uniform = torch.empty_like(x).uniform_() + torch.empty_like(x).uniform_()
        return x + torch.rand_like(x) + torch.rand_like(x) + uniform


def test_keeps_random_ops_apart():
    gm, _ = capture(RandomTwice(), torch.randn(3, 4))
    random = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())
    ]
    assert len(random) == 4 and ops(gm)[aten.uniform.default] == 2
    empties = ops(gm)[aten.empty_permuted.default]
    assert empties == 2
    cse(gm, CFG)
    assert set(random) <= set(gm.graph.nodes)
    assert ops(gm)[aten.empty_permuted.default] == empties


class IntAndFloat(nn.Module):
    def forward(self, x):
        return (x + 1) * 2, (x + 1.0) * 2  # same target and "equal" args, different dtypes


def test_does_not_merge_int_and_float_scalars():
    model = IntAndFloat()
    gm, inputs = capture(model, torch.arange(6).reshape(2, 3))
    assert_noop(cse, gm)
    assert_matches_eager(model, gm, *inputs)


class ReturnsTwice(nn.Module):
    def forward(self, x):
        return torch.relu(x), torch.relu(x)


def test_keeps_returned_tensors_distinct():
    model = ReturnsTwice()
    gm, inputs = capture(model, torch.randn(3))
    assert_noop(cse, gm)
    a, b = gm(*inputs)
    assert a is not b


class EqualConstants(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("a", torch.arange(4.0))
        self.register_buffer("b", torch.arange(4.0))
        self.register_buffer("c", torch.arange(4.0) + 1)

    def forward(self, x):
        return (x + self.a) * (x + self.b) + self.c


def test_merges_equal_constants():
    model = EqualConstants()
    gm, inputs = capture(model, torch.randn(2, 4))
    assert len(gm.graph.find_nodes(op="get_attr")) == 3

    result = cse(gm, CFG)

    assert result.stats == {"merged": 1, "merged_constants": 1}  # b -> a, then x + b -> x + a
    assert len(gm.graph.find_nodes(op="get_attr")) == 2
    assert ops(gm)[aten.add.Tensor] == 2
    assert_matches_eager(model, gm, *inputs)


def test_runs_inside_an_active_fake_mode():
    model = EqualConstants()
    gm, inputs = capture(model, torch.randn(2, 4))
    with fake_mode_of(gm):  # torch.compile calls the backend inside the graph's fake mode
        result = cse(gm, CFG)
    assert result.stats == {"merged": 1, "merged_constants": 1}
    assert_matches_eager(model, gm, *inputs)


def test_merges_get_attrs_of_one_target():
    model = nn.Linear(4, 4)
    gm, inputs = capture(model, torch.randn(2, 4))
    weight = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("weight"))
    with gm.graph.inserting_after(weight):
        twin = gm.graph.get_attr(weight.target)
    twin.meta["val"] = weight.meta["val"]
    permute = next(iter(weight.users))
    permute.replace_input_with(weight, twin)
    gm.recompile()

    result = cse(gm, CFG)

    assert result.stats == {"merged": 0, "merged_constants": 1}
    assert [n.target for n in gm.graph.find_nodes(op="get_attr")].count(weight.target) == 1
    assert_matches_eager(model, gm, *inputs)


def test_nothing_to_merge_leaves_graph_unchanged():
    gm, _ = capture(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.randn(2, 4))
    assert_noop(cse, gm)


class Flattens(nn.Module):
    def forward(self, x):
        return torch.relu(x.reshape(x.shape[0], -1)) + x.reshape(x.shape[0], -1).sigmoid()


def test_symbolic_batch():
    model = Flattens()
    gm, _ = capture(model, torch.randn(4, 2, 3), dynamic_shapes=batch_dim())
    views = ops(gm)[aten.view.default]
    assert views == 2

    result = cse(gm, CFG)

    assert result.modified and ops(gm)[aten.view.default] == 1
    for batch in (2, 6):
        assert_matches_eager(model, gm, torch.randn(batch, 2, 3))
