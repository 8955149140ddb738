"""The prune pass: channel groups found on the ATen graph, tensors cut to size, exact numerics.

The oracle for structured pruning: a model whose upper half of channels in every hidden layer
is dead (zero weights, zero bias, zero BatchNorm shift) computes the same as the model with
those channels removed. The l2 importance of a dead channel is 0, so at sparsity 0.5 the pass
must remove exactly them, and the pruned graph must match eager while its tensors shrink.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphopt.config import Config
from graphopt.passes.base import find_sites, get_attr_value
from graphopt.passes.channel_groups import ChannelAnalysis
from graphopt.passes.dce import eliminate_dead_code
from graphopt.passes.fold_batchnorm import fold_batchnorm
from graphopt.passes.fold_constants import fold_constants
from graphopt.passes.prune import prune
from graphopt.report import Report
from tests.models import DepthwiseSeparable, ResidualCNN
from tests.passes.conftest import assert_matches_eager, batch_dim, capture

aten = torch.ops.aten
HALF = Config(sparsity=0.5, structured=True)


def _folded(model, *inputs, dynamic_shapes=None):
    """The graph the pipeline hands the prune pass: BN folded, weights single constants."""
    gm, example = capture(model, *inputs, dynamic_shapes=dynamic_shapes)
    fold_batchnorm(gm, Config())
    fold_constants(gm, Config())
    gm.recompile()
    return gm, example


def _pruned(gm, cfg=HALF):
    result = prune(gm, cfg)
    eliminate_dead_code(result.gm, cfg)
    result.gm.recompile()
    return result


def kill_upper_half(model: nn.Module, keep: tuple[str, ...] = ()) -> nn.Module:
    """Make the upper half of the output channels of every conv/linear not named in `keep`
    dead: zero weights and bias, and zero BatchNorm shift after them."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if name in keep:
                continue
            if isinstance(m, nn.Conv2d | nn.Linear):
                c = m.weight.shape[0]
                m.weight[c // 2 :] = 0
                if m.bias is not None:
                    m.bias[c // 2 :] = 0
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.bias[c // 2 :] = 0
                m.running_mean[c // 2 :] = 0
    return model.eval()


class _MetaMatchesRun(torch.fx.Interpreter):
    """Runs the graph and checks every node's meta["val"] shape against the real value."""

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            assert tuple(n.meta["val"].shape) == tuple(out.shape), n.name
        return out


def _weight_shapes(gm):
    return {
        s.name.split(" (")[0]: tuple(get_attr_value(gm, s.weight).shape) for s in find_sites(gm)
    }


# ------------------------------------------------------------------ models with every coupling


class InvertedResidualNet(nn.Module):
    """stem -> MobileNetV2 block (expand, depthwise, project, residual) twice -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.block1 = DepthwiseSeparable(16, expand=4)
        self.block2 = DepthwiseSeparable(16, expand=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class FlattenNet(nn.Module):
    """conv -> flatten (channels spread over H*W positions) -> linear; and a channels-last
    flatten (permute first: each channel repeats every C positions)."""

    def __init__(self, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        y = F.relu(self.conv(x))
        if self.channels_last:
            y = y.permute(0, 2, 3, 1)
        return self.fc2(F.gelu(self.fc1(y.flatten(1))))


class ConcatSENet(nn.Module):
    """Two branches concatenated, then a squeeze-and-excitation gate (a multiply that ties the
    gate's producer to the features)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.mix = nn.Conv2d(12, 8, 1)
        self.squeeze = nn.Linear(8, 4)
        self.excite = nn.Linear(4, 8)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        y = F.relu(self.mix(y))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(y.mean((2, 3))))))
        return self.head(y * gate[:, :, None, None]).mean((2, 3))


class FeedForward(nn.Module):
    """A transformer FFN on [batch, seq, d]: the hidden width is prunable, d is not."""

    def __init__(self, d: int = 16, hidden: int = 32, bias: bool = True):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden, bias=bias), nn.Linear(hidden, d, bias=bias)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


CASES = {
    "resnet": (lambda: ResidualCNN(width=8), (2, 3, 16, 16), ("fc",)),
    "mobilenet": (InvertedResidualNet, (2, 3, 8, 8), ("fc",)),
    "flatten": (FlattenNet, (2, 2, 4, 4), ("fc2",)),
    "flatten_channels_last": (lambda: FlattenNet(True), (2, 2, 4, 4), ("fc2",)),
    "concat_se": (ConcatSENet, (2, 3, 6, 6), ("head",)),
    "feedforward": (FeedForward, (2, 5, 16), ("down",)),
    "feedforward_no_bias": (lambda: FeedForward(bias=False), (2, 5, 16), ("down",)),  # aten.mm
}


@pytest.mark.parametrize("case", CASES)
def test_structured_removes_exactly_the_dead_channels_and_matches_eager(case):
    make, shape, outputs = CASES[case]
    torch.manual_seed(0)
    model = kill_upper_half(make(), keep=outputs)
    x = torch.randn(*shape)
    gm, _ = _folded(model, x)
    before = _weight_shapes(gm)
    result = _pruned(gm)
    assert result.modified and result.stats["channels_removed"] > 0
    assert_matches_eager(model, result.gm, x)
    after = _weight_shapes(result.gm)
    for name, shape_before in before.items():
        # output channels halve unless the layer makes the model's output (or is tied to it)
        assert after[name][0] in (shape_before[0], shape_before[0] // 2), name
    assert sum(math.prod(s) for s in after.values()) < 0.6 * sum(
        math.prod(s) for s in before.values()
    )
    _MetaMatchesRun(result.gm).run(x)  # meta["val"] was refreshed everywhere
    out_node = next(iter(result.gm.graph.find_nodes(op="output")))
    assert out_node.args[0][0].meta["val"].shape == model(x).shape


def test_resnet_groups_tie_the_residual_stream_and_cut_consumers():
    model = kill_upper_half(ResidualCNN(width=8), keep=("fc",))
    gm, _ = _folded(model, torch.randn(2, 3, 16, 16))
    analysis = ChannelAnalysis(gm)
    by_layer = {tuple(sorted(n.split(" (")[0] for n in g.names)): g.fixed for g in analysis.groups}
    # stem and layer1.conv2 feed the same residual add: one group
    assert by_layer[("layer1.conv2", "stem.0")] is None
    assert by_layer[("layer2.conv2", "layer2.downsample.0")] is None
    assert by_layer[("fc",)] == "reaches the model output"
    result = _pruned(gm)
    shapes = _weight_shapes(result.gm)
    assert shapes["stem.0"] == (4, 3, 3, 3)
    assert shapes["layer2.conv1"] == (8, 4, 3, 3)  # reads the pruned stream, makes its own half
    assert shapes["fc"] == (8, 10)  # stored [in, out]: reads 8 of the 16 pooled channels


def test_channels_tied_to_a_model_input_or_an_op_without_rule_stay_whole():
    block = DepthwiseSeparable(8, expand=2)  # output = x + project(...): tied to the input
    gm, _ = _folded(block, torch.randn(1, 8, 4, 4))
    groups = {g.names[0].split(" (")[0]: g.fixed for g in ChannelAnalysis(gm).groups}
    assert "fixed size" in groups["project.0"]
    assert groups["expand.0"] is None

    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8)
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(self.norm(self.conv(x)))

    gm, _ = _folded(Normed().eval(), torch.randn(1, 3, 4, 4))
    groups = {g.names[0].split(" (")[0]: g.fixed for g in ChannelAnalysis(gm).groups}
    assert "no channel rule" in groups["conv"]
    assert _pruned(gm).stats["channels_removed"] == 0


class Affine(nn.Module):
    """Per-channel constants after a conv (x * scale + shift): they are cut with the channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.cat([torch.randn(4), torch.zeros(4)]).view(8, 1, 1))

    def forward(self, x):
        return self.out(torch.relu(self.conv(x) * self.scale + self.shift))


def test_per_channel_constants_are_cut_with_their_channels():
    model = kill_upper_half(Affine(), keep=("out",))  # shift is 0 on the dead channels too
    x = torch.randn(2, 3, 6, 6)
    gm, _ = _folded(model, x)
    result = _pruned(gm)
    assert result.stats["channels_removed"] == 4
    assert_matches_eager(model, result.gm, x)
    shapes = {
        tuple(get_attr_value(result.gm, n).shape)
        for n in result.gm.graph.find_nodes(op="get_attr")
        if n.users
    }
    assert (4, 1, 1) in shapes and (8, 1, 1) not in shapes


def test_dynamic_batch_views_keep_their_symbolic_sizes():
    model = kill_upper_half(FlattenNet(), keep=("fc2",))
    x = torch.randn(3, 2, 4, 4)
    gm, _ = _folded(model, x, dynamic_shapes=batch_dim())
    result = _pruned(gm)
    assert result.stats["channels_removed"] > 0
    for batch in (2, 7):
        x = torch.randn(batch, 2, 4, 4)
        assert_matches_eager(model, result.gm, x)


def test_round_to_exclude_and_custom_importance():
    model = nn.Sequential(
        nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 2)
    )
    x = torch.randn(2, 6)
    gm, _ = _folded(model.eval(), x)
    shapes = _weight_shapes(_pruned(gm, Config(sparsity=0.5, structured=True, prune_round_to=8)).gm)
    assert shapes["0"] == (6, 16) and shapes["2"] == (16, 16)  # 12 -> 16 and 10 -> 16

    gm, _ = _folded(model.eval(), x)
    result = _pruned(gm, Config(sparsity=0.5, structured=True, prune_exclude=("2",)))
    shapes = _weight_shapes(result.gm)
    assert shapes["0"] == (6, 12) and shapes["2"] == (12, 20)
    summary = result.gm.meta["graphopt.pruning"]
    assert summary.groups_fixed["excluded by prune_exclude"] == ["2 (addmm_1)"]

    def first_channels(weights):  # keep the lowest-numbered channels
        return -torch.arange(weights[0].shape[0], dtype=torch.float32)

    gm, _ = _folded(model.eval(), x)
    w0 = model[0].weight.detach()
    result = _pruned(gm, Config(sparsity=0.5, structured=True, prune_importance=first_channels))
    (first,) = [s for s in find_sites(result.gm) if s.name.startswith("0 ")]
    torch.testing.assert_close(get_attr_value(result.gm, first.weight), w0[:12].t())

    gm, _ = _folded(model.eval(), x)
    wrong = Config(sparsity=0.5, structured=True, prune_importance=lambda ws: torch.ones(3))
    with pytest.raises(
        ValueError, match=r"prune_importance returned shape \(3,\) for a group of 24"
    ):
        prune(gm, wrong)


def test_linear_weights_keep_their_transposed_layout():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    gm, _ = _folded(model, torch.randn(2, 8))
    result = _pruned(gm)
    for site in find_sites(result.gm):
        w = get_attr_value(result.gm, site.weight)  # [in, out], the transpose of [out, in]
        assert w.stride() == (1, w.shape[0])


# ------------------------------------------------------------------ unstructured and N:M


def _conv_mlp():
    return nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 12), nn.ReLU(),
        nn.Linear(12, 3),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_zeroes_exactly_the_smallest_weights(scope):
    model = _conv_mlp()
    x = torch.randn(2, 4, 6, 6)
    gm, _ = _folded(model, x)
    originals = {s.name: get_attr_value(gm, s.weight).clone() for s in find_sites(gm)}
    result = _pruned(gm, Config(sparsity=0.3, prune_scope=scope))
    pruned = {s.name: get_attr_value(result.gm, s.weight) for s in find_sites(result.gm)}
    total = sum(w.numel() for w in originals.values())
    zeros = {n: int((w == 0).sum()) for n, w in pruned.items()}
    if scope == "layer":
        for name, w in originals.items():
            assert zeros[name] == math.floor(0.3 * w.numel())
    else:
        assert sum(zeros.values()) == math.floor(0.3 * total)
        threshold = max(float(originals[n][pruned[n] == 0].abs().max()) for n in pruned)
        for w in pruned.values():  # every survivor is at least as large as every victim
            assert float(w[w != 0].abs().min()) >= threshold
    for name, w in pruned.items():  # survivors keep their values; shapes do not change
        torch.testing.assert_close(w[w != 0], originals[name][w != 0])
        assert w.shape == originals[name].shape
    assert result.stats["weights_zeroed"] == sum(zeros.values())
    with torch.no_grad():
        assert not torch.allclose(result.gm(x)[0], model(x))
    assert "storage only" in result.gm.meta["graphopt.pruning"].note


def test_two_of_four_along_input_channels():
    model = _conv_mlp()
    gm, _ = _folded(model, torch.randn(2, 4, 6, 6))
    result = _pruned(gm, Config(prune_pattern="2:4"))
    assert Config(prune_pattern="2:4").sparsity == 0.5
    for site in find_sites(result.gm):
        w = get_attr_value(result.gm, site.weight)
        along_input = w.movedim(1 if site.kind == "conv2d" else 0, -1).reshape(-1, 4)
        assert ((along_input != 0).sum(1) <= 2).all(), site.name
        assert ((along_input != 0).sum(1) == 2).all(), site.name  # random weights: no zeros


def test_two_of_four_leaves_layers_it_cannot_split_and_says_so():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    gm, _ = _folded(model, torch.randn(2, 6))
    result = _pruned(gm, Config(prune_pattern="2:4"))
    summary = result.gm.meta["graphopt.pruning"]
    assert summary.groups_fixed == {"input channels not a multiple of 4": ["0 (addmm)"]}
    report = Report("g", "cpu", pruning=summary)
    text = str(report)
    assert "prune: 50% of the weights, 2:4" in text and "left whole" in text


def test_report_lists_every_layer_before_and_after():
    model = kill_upper_half(ResidualCNN(width=8), keep=("fc",))
    gm, _ = _folded(model, torch.randn(2, 3, 16, 16))
    summary = _pruned(gm).gm.meta["graphopt.pruning"]
    assert [layer.layer.split(" (")[0] for layer in summary.layers] == [
        "stem.0",
        "layer1.conv1",
        "layer1.conv2",
        "layer2.conv1",
        "layer2.conv2",
        "layer2.downsample.0",
        "fc",
    ]
    stem = summary.layers[0]
    assert (stem.shape_before, stem.shape_after) == ((8, 3, 3, 3), (4, 3, 3, 3))
    assert stem.params_after * 2 == stem.params_before
    assert stem.flops_after * 2 == stem.flops_before and stem.bytes_after == 4 * 4 * 27
    text = str(Report("g", "cpu", pruning=summary))
    assert "8x3x3x3 -> 4x3x3x3" in text and "left whole (reaches the model output): fc" in text


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prune_pattern": "4:2"}, "'N:M' with 0 < N < M"),
        ({"prune_pattern": "2:4", "structured": True}, "structured=False"),
        ({"prune_pattern": "2:4", "sparsity": 0.3}, "sparsity is 0.5"),
        ({"prune_scope": "global", "structured": True, "sparsity": 0.5}, "applies to structured"),
        ({"prune_scope": "model"}, "accepted values: \\['layer', 'global'\\]"),
        ({"prune_importance": "taylor"}, "accepted values: \\['l2', 'l1'\\]"),
        ({"prune_round_to": 0}, "integer >= 1"),
    ],
)
def test_bad_pruning_options_name_the_accepted_values(options, message):
    with pytest.raises(ValueError, match=message):
        Config(**options)
