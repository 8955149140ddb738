import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphopt.passes.base import fake_mode_of
from graphopt.passes.fold_batchnorm import fold_batchnorm
from graphopt.passes.fold_constants import fold_constants
from tests.passes.conftest import (
    CFG,
    assert_matches_eager,
    assert_noop,
    batch_dim,
    capture,
    ops,
    randomize_batchnorm,
)

aten = torch.ops.aten
BN = aten._native_batch_norm_legit_no_training.default
WEIGHT_ARITHMETIC = [
    aten.rsqrt.default,
    aten.mul.Tensor,
    aten.add.Tensor,
    aten.neg.default,
    aten.reshape.default,
    aten.view.default,
    aten.permute.default,
]

CONVS = {
    "conv_bias": lambda: nn.Conv2d(4, 6, 3, bias=True),
    "conv_no_bias": lambda: nn.Conv2d(4, 6, 3, bias=False),
    "grouped": lambda: nn.Conv2d(4, 6, 3, groups=2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False),
    "conv1d": lambda: nn.Conv1d(4, 6, 3),
    "transposed_grouped": lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
}


def conv_bn(conv: nn.Module) -> nn.Module:
    bn = (nn.BatchNorm1d if isinstance(conv, nn.Conv1d) else nn.BatchNorm2d)(conv.out_channels)
    return randomize_batchnorm(nn.Sequential(conv, bn))


def conv_input(conv: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 9) if isinstance(conv, nn.Conv1d) else torch.randn(batch, 4, 7, 7)


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_folds_into_conv(kind):
    model = conv_bn(CONVS[kind]())
    x = conv_input(model[0])
    gm, inputs = capture(model, x)
    assert ops(gm)[BN] == 1

    result = fold_batchnorm(gm, CFG)

    assert result.modified
    assert result.stats == {"folded_into_conv": 1, "folded_into_linear": 0}
    after = ops(gm)
    assert after[BN] == 0 and after[aten.convolution.default] == 1
    assert after[aten.rsqrt.default] == 1  # the BN became weight arithmetic for fold_constants
    assert_matches_eager(model, gm, *inputs)


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_with_two_users_is_not_folded():
    model = randomize_batchnorm(TwoUsers())
    gm, _ = capture(model, torch.randn(2, 3, 8, 8))
    assert_noop(fold_batchnorm, gm)
    assert ops(gm)[BN] == 1


class BatchNormWithInputWeight(nn.Module):
    """BN whose scale is a graph input (as in training graphs): not constant, not folded."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x, gamma):
        bn = self.bn
        return F.batch_norm(
            self.conv(x),
            bn.running_mean,
            bn.running_var,
            gamma,
            bn.bias,
            training=False,
            eps=bn.eps,
        )


def test_non_constant_batchnorm_is_not_folded():
    model = randomize_batchnorm(BatchNormWithInputWeight())
    gm, inputs = capture(model, torch.randn(2, 3, 8, 8), torch.rand(4))
    assert ops(gm)[BN] == 1
    assert_noop(fold_batchnorm, gm)
    assert_matches_eager(model, gm, *inputs)


@pytest.mark.parametrize("bias", [True, False])
def test_folds_into_linear(bias):
    model = randomize_batchnorm(nn.Sequential(nn.Linear(8, 5, bias=bias), nn.BatchNorm1d(5)))
    gm, inputs = capture(model, torch.randn(3, 8))
    assert ops(gm)[aten.addmm.default if bias else aten.mm.default] == 1

    result = fold_batchnorm(gm, CFG)

    assert result.stats == {"folded_into_conv": 0, "folded_into_linear": 1}
    after = ops(gm)
    assert after[BN] == 0 and after[aten.mm.default] == 0 and after[aten.addmm.default] == 1
    assert_matches_eager(model, gm, *inputs)


class ConvAndLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn2d = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.fc, self.bn1d = nn.Linear(4, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        y = torch.relu(self.bn2d(self.conv(x)))
        return self.bn1d(self.fc(y.mean((2, 3))))


def test_with_fold_constants_no_batchnorm_or_weight_arithmetic_remains():
    model = randomize_batchnorm(ConvAndLinear())
    gm, inputs = capture(model, torch.randn(2, 3, 8, 8))
    params_before = len(list(gm.buffers()))

    assert fold_batchnorm(gm, CFG).stats == {"folded_into_conv": 1, "folded_into_linear": 1}
    assert fold_constants(gm, CFG).modified

    after = ops(gm)
    assert after[BN] == 0
    assert not any(after[op] for op in WEIGHT_ARITHMETIC), after
    assert after[aten.convolution.default] == 1 and after[aten.addmm.default] == 1
    assert len(list(gm.buffers())) < params_before
    assert_matches_eager(model, gm, *inputs)


def test_runs_inside_an_active_fake_mode():
    model = randomize_batchnorm(ConvAndLinear())
    gm, inputs = capture(model, torch.randn(2, 3, 8, 8))
    with fake_mode_of(gm):  # torch.compile calls the backend inside the graph's fake mode
        result = fold_batchnorm(gm, CFG)
    assert result.stats == {"folded_into_conv": 1, "folded_into_linear": 1}
    assert_matches_eager(model, gm, *inputs)


def test_no_batchnorm_leaves_graph_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    gm, _ = capture(model, torch.randn(1, 3, 6, 6))
    assert_noop(fold_batchnorm, gm)


def test_symbolic_batch():
    model = randomize_batchnorm(ConvAndLinear())
    gm, _ = capture(model, torch.randn(4, 3, 8, 8), dynamic_shapes=batch_dim())

    result = fold_batchnorm(gm, CFG)
    fold_constants(gm, CFG)

    assert result.stats == {"folded_into_conv": 1, "folded_into_linear": 1}
    assert ops(gm)[BN] == 0
    for batch in (2, 5):
        assert_matches_eager(model, gm, torch.randn(batch, 3, 8, 8))
