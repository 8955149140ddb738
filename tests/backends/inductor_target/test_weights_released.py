"""target="cpu": once inductor has frozen the weights into its compiled code, graphopt's copies
of the weights it repacked are freed (a model's weights are held once, not three times), and
the heap compiling used goes back to the OS."""

import gc
import weakref

import pytest
import torch
import torch._inductor.compile_fx
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import graphopt
from graphopt import compiler
from graphopt.backends import inductor
from graphopt.config import Config
from graphopt.testing import assert_same_outputs

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(),
    reason="inductor prepacks conv weights for oneDNN: this torch has no oneDNN",
)


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)
    ).eval()


@pytest.fixture
def compiled_weights(monkeypatch):
    """Weak references to the weights of each graph graphopt hands to inductor."""
    refs: list[weakref.ref] = []
    compile_fx = torch._inductor.compile_fx.compile_fx

    def recording(gm, example_inputs, *args, **kwargs):
        refs.extend(weakref.ref(b) for b in gm.buffers() if b.dim() == 4)  # conv weights
        return compile_fx(gm, example_inputs, *args, **kwargs)

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", recording)
    return refs


@pytest.mark.parametrize("entry", ["optimize", "torch.compile"])
def test_prepacked_weights_are_freed_and_the_model_still_matches_eager(compiled_weights, entry):
    model, x = _convnet(), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        if entry == "optimize":
            run = graphopt.optimize(model, (x,), verify=True)
        else:
            run = torch.compile(model, backend="graphopt", options={"verify": True})
        got = run(x)
        gc.collect()
        assert len(compiled_weights) == 2
        assert all(ref() is None for ref in compiled_weights)  # only the packed copies live on
        assert_same_outputs(model(x), got)
        assert_same_outputs(model(x), run(x))


def test_the_optimized_graph_keeps_its_code_but_not_its_weights():
    model, x = _convnet(), torch.randn(1, 3, 16, 16)
    opt = graphopt.optimize(model, (x,))
    assert "convolution" in opt.graph_module.code
    assert all(b.is_meta for b in opt.graph_module.buffers())
    with pytest.raises(RuntimeError, match="discarded"):
        opt.graph_module(x)


def test_int8_calibrated_on_calls_drops_its_float_graph():
    model, x = _convnet(), torch.randn(1, 3, 16, 16)
    opt = graphopt.optimize(model, (x,), quantize="int8", calibration=2, verify=True)
    with torch.no_grad():
        for _ in range(2):
            opt(x)
        assert opt.report.verified
        gc.collect()
        assert opt._compiled.gm is None
        int8 = opt(x)
        assert not torch.equal(int8, model(x))
        assert (int8 - model(x)).abs().max() < 0.1 * model(x).abs().max()


def test_a_graph_that_writes_to_a_weight_keeps_its_weights():
    class Accumulate(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("total", torch.zeros(4))
            self.register_buffer("scale", torch.full((4,), 2.0))

        def forward(self, x):
            self.total.add_(x)
            return self.total * self.scale

    # An ATen graph with the write in place, as inductor may be handed one (export and
    # aot_autograd functionalize theirs): inductor keeps `total` an input of the compiled code.
    gm = make_fx(Accumulate())(torch.zeros(4))
    fn = inductor.compile_inductor(gm, [torch.ones(4)], Config())
    assert torch.equal(fn(torch.ones(4)), torch.full((4,), 2.0))
    assert torch.equal(fn(torch.ones(4)), torch.full((4,), 4.0))


def test_a_model_that_returns_its_weights_still_returns_them():
    class Returns(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.w, self.w.t(), self.w[0]

    model, x = Returns().eval(), torch.randn(2, 4)
    opt = graphopt.optimize(model, (x,))
    gc.collect()
    with torch.no_grad():
        assert_same_outputs(model(x), opt(x))


def test_compiling_hands_the_heap_it_freed_back_to_the_os(monkeypatch):
    calls = []
    monkeypatch.setattr(compiler, "_malloc_trim", lambda: calls.append)
    graphopt.optimize(_convnet(), (torch.randn(1, 3, 16, 16),))
    assert calls == [0]


def test_a_graph_that_writes_into_an_input_still_frees_its_weights(compiled_weights):
    """A decoder's static KV cache is an input written in place on every call: the weights,
    which nothing writes, are freed all the same (each graph held a copy of them before)."""

    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = _convnet()

        def forward(self, x, cache):
            y = self.conv(x)
            cache.copy_(y)
            return y + 1

    model, x, cache = Cached(), torch.randn(1, 3, 16, 16), torch.zeros(1, 8, 16, 16)
    run = torch.compile(model, backend="graphopt")
    with torch.no_grad():
        got = run(x, cache)
        gc.collect()
        assert len(compiled_weights) == 2
        assert all(ref() is None for ref in compiled_weights)
        assert_same_outputs(model.conv(x), cache)
        assert_same_outputs(model.conv(x) + 1, got)
