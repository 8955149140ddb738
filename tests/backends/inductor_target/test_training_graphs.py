"""Training graphs on target="cpu": what inductor may assume about the forward's saved tensors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import graphopt
from graphopt.backends.inductor import _donatable
from graphopt.testing import assert_same_outputs


def _forward(saved_twice: bool) -> torch.fx.GraphModule:
    """A forward graph returning (user output, saved a, saved b), a and b one tensor or two."""

    def forward(x):
        y = x.sin()
        return x.cos(), y, y if saved_twice else x.exp()

    return make_fx(forward, tracing_mode="fake")(torch.randn(4))


def test_a_tensor_saved_twice_is_not_donated():
    """aot_autograd lets the backward overwrite ("donate") saved activations no input or user
    output shares; graphopt's passes can make two saves one tensor, which must then survive."""
    meta = SimpleNamespace(
        tensors_saved_for_backwards_slice=slice(1, 3),
        num_symints_saved_for_bw=0,
        bw_donated_idxs=[0, 1],
    )
    assert _donatable(_forward(saved_twice=False), meta) == [0, 1]
    assert _donatable(_forward(saved_twice=True), meta) == []
    meta.num_symints_saved_for_bw = 2  # backward inputs: symints first, then the tensors
    meta.bw_donated_idxs = [2, 3]
    assert _donatable(_forward(saved_twice=False), meta) == [2, 3]


@pytest.mark.parametrize("ceil_mode", [True, False])
@pytest.mark.parametrize("dims", [2, 3])
def test_average_pool_gradients_with_ceil_mode(dims, ceil_mode):
    """inductor's avg_pool backward is wrong when a ceil-mode window overhangs the input; such
    nodes run torch's kernel (MISLOWERED), the others stay inductor's."""
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
    x = torch.randn(1, 2, *[7] * dims, requires_grad=True)

    def f(x):
        return pool(x, 2, 2, ceil_mode=ceil_mode).square().sum()

    expected = torch.autograd.grad(f(x), x)
    graphopt.clear_reports()
    got = torch.autograd.grad(torch.compile(f, backend="graphopt")(x), x)
    assert_same_outputs(expected, got)
    (backward,) = [r for r in graphopt.reports() if r.mode == "training-backward"]
    assert not backward.fallbacks
