import operator

import torch
from torch import nn

from graphopt.backends.registry import OpRegistry
from graphopt.passes.partition import PREFIX, partition_by_capability, unsupported_nodes
from tests.passes.conftest import CFG, capture

aten = torch.ops.aten


def registry_without(*missing) -> OpRegistry:
    """A registry with a rule for every op of the test graphs except `missing`."""
    reg = OpRegistry("test")
    ops = [
        aten.addmm.default,
        aten.permute.default,
        aten.relu.default,
        aten.mul.Tensor,
        aten.native_layer_norm.default,
        aten._fft_r2c.default,
        aten.abs.default,
        aten.sum.dim_IntList,
        operator.getitem,
    ]
    for op in ops:
        if op not in missing:
            reg.rule(op)(lambda ctx, node: None)
    return reg


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        y = torch.relu(self.norm(self.lin(x)))
        return torch.fft.rfft(y).abs().sum(-1) * 2, y


def test_unsupported_op_splits_the_graph_and_numerics_hold():
    model = Model().eval()
    x = torch.randn(3, 8)
    gm, _ = capture(model, x)
    result = partition_by_capability(gm, CFG, registry_without(aten._fft_r2c.default))
    split = result.gm
    assert result.modified and result.stats["partitions"] == 2
    top_level_ops = [n.target for n in split.graph.nodes if n.op == "call_function"]
    assert aten._fft_r2c.default in top_level_ops
    calls = [n for n in split.graph.nodes if n.op == "call_module"]
    assert all(n.target.startswith(PREFIX) for n in calls)
    # Weights travel into the partitions as constants, not as runtime inputs.
    assert result.stats["constants_moved"] == 4
    for call in calls:
        assert all(a.op != "get_attr" for a in call.args if isinstance(a, torch.fx.Node))
    with torch.no_grad():
        expected = model(x)
        got = split(x)
    torch.testing.assert_close(got, expected)


def test_unsupported_nodes_reports_multi_output_op_once():
    gm, _ = capture(Model().eval(), torch.randn(3, 8))
    missing = unsupported_nodes(gm, registry_without(aten.native_layer_norm.default), CFG)
    assert [op for _, op, _ in missing] == ["aten.native_layer_norm.default"]
    assert "no test rule for aten.native_layer_norm.default" in missing[0][2]


def test_fully_supported_graph_is_one_partition():
    gm, _ = capture(Model().eval(), torch.randn(3, 8))
    assert unsupported_nodes(gm, registry_without(), CFG) == []
    result = partition_by_capability(gm, CFG, registry_without())
    assert result.stats["partitions"] == 1


def test_nothing_supported_leaves_graph_alone():
    gm, _ = capture(nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4))
    result = partition_by_capability(gm, CFG, OpRegistry("empty"))
    assert result.modified is False and result.stats["partitions"] == 0
