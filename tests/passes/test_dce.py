import torch
from torch import nn

from graphopt.passes.dce import eliminate_dead_code
from tests.passes.conftest import CFG, assert_matches_eager, assert_noop, batch_dim, capture, ops

aten = torch.ops.aten


def add_dead_nodes(gm: torch.fx.GraphModule) -> None:
    """Append unused work: a pure chain on the input and an unused constant read."""
    x = gm.graph.find_nodes(op="placeholder")[0]
    gm.register_buffer("unused", torch.randn(64))
    with gm.graph.inserting_before(gm.graph.output_node()):
        relu = gm.graph.call_function(aten.relu.default, (x,))
        gm.graph.call_function(aten.mul.Tensor, (relu, 2))
        gm.graph.get_attr("unused")
    gm.recompile()


def test_removes_dead_nodes_and_unused_constants():
    model = nn.Linear(4, 3)
    gm, inputs = capture(model, torch.randn(2, 4))
    add_dead_nodes(gm)
    buffers = len(list(gm.buffers()))

    result = eliminate_dead_code(gm, CFG)

    assert result.modified
    assert result.stats == {"removed_nodes": 3, "removed_constants": 1}
    assert ops(gm)[aten.relu.default] == 0 and ops(gm)[aten.mul.Tensor] == 0
    assert not hasattr(gm, "unused") and len(list(gm.buffers())) == buffers - 1
    assert_matches_eager(model, gm, *inputs)


def test_keeps_impure_nodes():
    gm, _ = capture(nn.ReLU(), torch.randn(3))
    x = gm.graph.find_nodes(op="placeholder")[0]
    with gm.graph.inserting_before(gm.graph.output_node()):
        gm.graph.call_function(aten.rand_like.default, (x,))  # advances the RNG: not dead
    gm.recompile()

    assert_noop(eliminate_dead_code, gm)
    assert ops(gm)[aten.rand_like.default] == 1


def test_removes_constants_orphaned_by_a_rewrite():
    gm, _ = capture(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.randn(2, 4))
    bias = next(n for n in gm.graph.find_nodes(op="get_attr") if n.target.endswith("bias"))
    addmm = next(iter(bias.users))
    with gm.graph.inserting_before(addmm):  # rewire the bias away, as a pass would
        zeros = gm.graph.call_function(aten.zeros.default, ([3],))
    addmm.replace_input_with(bias, zeros)
    gm.recompile()

    result = eliminate_dead_code(gm, CFG)

    assert result.stats == {"removed_nodes": 1, "removed_constants": 1}
    assert not hasattr(gm, bias.target)


def test_nothing_dead_leaves_graph_unchanged():
    gm, _ = capture(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.randn(2, 4))
    assert_noop(eliminate_dead_code, gm)


def test_symbolic_batch():
    model = nn.Linear(4, 3)
    gm, _ = capture(model, torch.randn(5, 4), dynamic_shapes=batch_dim())
    add_dead_nodes(gm)

    result = eliminate_dead_code(gm, CFG)

    assert result.stats == {"removed_nodes": 3, "removed_constants": 1}
    for batch in (2, 8):
        assert_matches_eager(model, gm, torch.randn(batch, 4))
