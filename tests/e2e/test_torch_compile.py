"""torch.compile(model, backend="graphopt") against eager, end to end."""

import pytest
import torch

import graphopt
from graphopt.testing import assert_same_outputs
from tests.models import (
    MLP,
    DataDependentBranch,
    DepthwiseSeparable,
    ResidualCNN,
    SpectralHead,
    TransformerBlock,
    tiny_bert,
)

TARGETS = ["cpu", "llvm"]  # the test extras install TVM: no skipping when it is missing

CASES = {
    "mlp": (MLP, lambda: (torch.randn(4, 32),)),
    "residual_cnn": (ResidualCNN, lambda: (torch.randn(2, 3, 16, 16),)),
    "depthwise_separable": (DepthwiseSeparable, lambda: (torch.randn(2, 16, 8, 8),)),
    "transformer_layer": (TransformerBlock, lambda: (torch.randn(2, 6, 32),)),
}


def compile_and_compare(model, inputs, **options):
    compiled = torch.compile(model, backend="graphopt", options=options)
    with torch.no_grad():
        assert_same_outputs(model(*inputs), compiled(*inputs))
    return graphopt.reports()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_model_matches_eager(case, target):
    make, inputs = CASES[case]
    reports = compile_and_compare(make().eval(), inputs(), target=target)
    assert len(reports) == 1, "one graph, no graph breaks"
    report = reports[0]
    assert report.passes, "the pipeline ran"
    if target == "llvm":  # everything in these models has a TVM rule: nothing may fall back
        assert not report.fallbacks, str(report)
        assert all(p.target == "tvm-llvm" for p in report.partitions), str(report)


def test_batchnorm_is_folded_away():
    reports = compile_and_compare(ResidualCNN().eval(), (torch.randn(2, 3, 16, 16),))
    report = reports[0]
    folds = {p.name: p for p in report.passes}
    assert folds["fold_batchnorm"].stats.get("folded_into_conv", 0) == 6  # every BN
    lowered_ops = report.partitions[0].ops
    assert not any("batch_norm" in op for op in lowered_ops), lowered_ops
    assert report.flops_after <= report.flops_before


def test_unsupported_op_falls_back_to_pytorch():
    reports = compile_and_compare(SpectralHead().eval(), (torch.randn(3, 16),), target="llvm")
    report = reports[0]
    fallback_ops = {f.op for f in report.fallbacks}
    assert "aten._fft_r2c.default" in fallback_ops, str(report)
    assert {p.target for p in report.partitions} >= {"tvm-llvm", "torch"}
    assert "_fft_r2c" in str(report)


def test_fallback_error_lists_every_unsupported_node():
    model = SpectralHead().eval()
    compiled = torch.compile(
        model, backend="graphopt", options={"target": "llvm", "fallback": "error"}
    )
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(torch.randn(3, 16))
    err = info.value
    while err is not None and not isinstance(err, graphopt.UnsupportedOpError):
        err = err.__cause__ or getattr(err, "inner_exception", None)
    assert isinstance(err, graphopt.UnsupportedOpError), repr(info.value)
    assert any(op == "aten._fft_r2c.default" for _, op, _ in err.nodes)
    assert "_fft_r2c" in str(err)


@pytest.mark.parametrize("target", TARGETS)
def test_graph_break_on_item(target):
    model = DataDependentBranch().eval()
    compiled = torch.compile(model, backend="graphopt", options={"target": target})
    with torch.no_grad():
        for seed in range(4):  # both branches
            torch.manual_seed(seed)
            x = torch.randn(2, 8)
            assert_same_outputs(model(x), compiled(x))
    assert len(graphopt.reports()) >= 2, "the .item() splits the model into several graphs"


def test_dynamic_batch_compiles_at_most_twice():
    model = ResidualCNN().eval()
    compiled = torch.compile(model, backend="graphopt")
    with torch.no_grad():
        for batch in (2, 3, 5, 8):
            x = torch.randn(batch, 3, 16, 16)
            assert_same_outputs(model(x), compiled(x))
    # dynamo compiles batch 2 statically, then once with a symbolic batch for 3, 5 and 8.
    assert len(graphopt.reports()) <= 2


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", ["mlp", "transformer_layer"])
def test_dynamic_true_compiles_once(case, target):
    make, inputs = CASES[case]
    model = make().eval()
    shape = inputs()[0].shape[1:]
    compiled = torch.compile(model, backend="graphopt", dynamic=True, options={"target": target})
    with torch.no_grad():
        for batch in (2, 3, 5, 8):
            x = torch.randn(batch, *shape)
            assert_same_outputs(model(x), compiled(x))
    (report,) = graphopt.reports()
    assert not report.fallbacks, str(report)


@pytest.mark.parametrize(
    "make,shape",
    [(ResidualCNN, (4, 3, 16, 16)), (lambda: MLP(dropout=0.0), (4, 32))],
    ids=["residual_cnn", "mlp"],
)
def test_training_gradients_match_eager(make, shape):
    torch.manual_seed(0)
    model = make().train()
    reference = make().train()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(*shape)
    loss = torch.compile(model, backend="graphopt")(x).square().mean()
    loss.backward()
    ref_loss = reference(x).square().mean()
    ref_loss.backward()
    assert_same_outputs(ref_loss, loss)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_same_outputs(q.grad, p.grad)
    # BatchNorm's running statistics are updated by the compiled forward as in eager.
    for b, c in zip(model.buffers(), reference.buffers()):
        assert_same_outputs(c, b)
    modes = {r.mode for r in graphopt.reports()}
    assert modes == {"training-forward", "training-backward"}


def test_transformer_training_gradients_match_eager():
    torch.manual_seed(0)
    model = TransformerBlock(dropout=0.0)  # dropout draws differ between eager and compiled
    reference = TransformerBlock(dropout=0.0)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 32)
    torch.compile(model, backend="graphopt")(x).square().mean().backward()
    reference(x).square().mean().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_same_outputs(q.grad, p.grad)


def test_transformers_bert_from_config():
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    compiled = torch.compile(model, backend="graphopt")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_same_outputs(expected, got)


def test_options_are_validated():
    model = MLP().eval()
    with pytest.raises(Exception, match="quantise.*did you mean 'quantize'"):
        torch.compile(model, backend="graphopt", options={"quantise": "int8"})(torch.randn(2, 32))
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"'target' got 'tpu'; accepted values: \['cpu'"):
        torch.compile(model, backend="graphopt", options={"target": "tpu"})(torch.randn(2, 32))


def test_verify_passes_on_a_correct_pipeline():
    compile_and_compare(ResidualCNN().eval(), (torch.randn(2, 3, 16, 16),), verify=True)
    assert graphopt.reports()[0].verified is True


@pytest.mark.parametrize("target", TARGETS)
def test_weights_changed_in_place_are_compiled_anew(target):
    """Frozen weights are copies, and each call checks it passes the weights they were copied
    from: after an in-place update the model is compiled again, never partly updated."""
    model = ResidualCNN().eval()
    x = torch.randn(1, 3, 16, 16)
    compiled = torch.compile(model, backend="graphopt", options={"target": target})
    with torch.no_grad():
        assert_same_outputs(model(x), compiled(x))
        compiled(x)
        assert len(graphopt.reports()) == 1, "the same weights: no new compile"
        before = model(x)
        for p in model.parameters():
            p.mul_(1.5)
        after = model(x)
        assert not torch.allclose(before, after)
        assert_same_outputs(after, compiled(x))
        assert len(graphopt.reports()) == 2


def test_weights_are_frozen_when_inductors_freezing_is_on_globally():
    """With `torch._inductor.config.freezing = True` (what inductor users set for inference)
    dynamo hands the parameters over as attributes of its graph and aot_autograd passes them
    first: graphopt still folds them into constants (it ran them as inputs, unfolded, before),
    and an in-place update still compiles anew."""
    model = ResidualCNN().eval()
    x = torch.randn(1, 3, 16, 16)
    compiled = torch.compile(model, backend="graphopt")
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        assert_same_outputs(model(x), compiled(x))
        (report,) = graphopt.reports()
        assert report.weight_bytes_before > 0, str(report)  # weights are constants
        for p in model.parameters():
            p.mul_(1.5)
        assert_same_outputs(model(x), compiled(x))
    assert len(graphopt.reports()) == 2


@pytest.mark.parametrize("target", TARGETS)
def test_two_instances_get_their_own_weights(target):
    """dynamo reuses one graph for every instance of a class (it does not guard parameters):
    a second instance with other weights must not be answered with the first one's."""
    first, second = ResidualCNN().eval(), ResidualCNN().eval()
    x = torch.randn(1, 3, 16, 16)
    options = {"target": target}
    one = torch.compile(first, backend="graphopt", options=options)
    two = torch.compile(second, backend="graphopt", options=options)
    with torch.no_grad():
        assert not torch.allclose(first(x), second(x))
        for _ in range(2):  # back and forth: each instance finds its own compiled graph
            assert_same_outputs(first(x), one(x))
            assert_same_outputs(second(x), two(x))
    assert len(graphopt.reports()) == 2


def test_weight_variants_are_bounded():
    """At most `_WeightVariants.LIMIT` compiled graphs are kept per dynamo graph (the most
    recently used); a stale one (its tensors updated in place) is dropped when its replacement
    is compiled."""
    from graphopt.backend import _WeightVariants

    weights = [torch.ones(2) for _ in range(_WeightVariants.LIMIT + 2)]
    compiles = []

    def compile_for(args):
        compiles.append(args[0])
        return f"w{len(compiles)}"

    variants = _WeightVariants([0], [weights[0]], "w0", compile_for)
    for n, w in enumerate(weights[1:], start=1):
        assert variants.for_call([w]) == f"w{n}"
    assert len(variants.variants) == _WeightVariants.LIMIT
    assert variants.for_call([weights[-1]]) == f"w{len(weights) - 1}"
    assert len(compiles) == len(weights) - 1, "a kept variant is not compiled again"
    weights[-1].add_(1)
    assert variants.for_call([weights[-1]]) == f"w{len(weights)}"
    assert len(variants.variants) == _WeightVariants.LIMIT, "the stale variant was replaced"
    assert variants.for_call([weights[0]]) == f"w{len(weights) + 1}", "evicted: compiled again"


def test_inductors_cpp_wrapper_only_for_static_inference_graphs(monkeypatch):
    """target="cpu" compiles inference graphs of static shapes with inductor's C++ wrapper;
    dynamic shapes and training graphs keep the Python one (where the C++ one fails)."""
    from graphopt.backends import inductor

    seen = []
    settings = inductor._settings
    monkeypatch.setattr(
        inductor, "_settings", lambda *args: seen.append(settings(*args)) or seen[-1]
    )
    wrapper = lambda: {key: seen[-1][key] for key in ("freezing", "cpp_wrapper")}  # noqa: E731
    model = MLP().eval()
    with torch.no_grad():
        for dynamic in (False, True):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="graphopt", dynamic=dynamic)
            for batch in (4, 5):
                x = torch.randn(batch, 32)
                assert_same_outputs(model(x), compiled(x))
            assert wrapper() == {"freezing": True, "cpp_wrapper": not dynamic}, dynamic
    torch._dynamo.reset()
    model.train()
    torch.compile(model, backend="graphopt")(torch.randn(4, 32)).sum().backward()
    assert wrapper() == {"freezing": False, "cpp_wrapper": False}


class WithTensorLiteral(torch.nn.Module):
    """A forward that builds a tensor: dynamo hands it over as a real constant of the graph."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) * torch.tensor([2.0, 3.0, 4.0, 5.0])


@pytest.mark.parametrize("target", TARGETS)
def test_forward_building_a_tensor_literal(target):
    """graphopt keeps a copy of the graph for other weights (another instance, an update);
    copying the literal inside torch.compile's fake mode failed with "Attempted to set the
    storage of a tensor on device meta" (every Hugging Face decoder with the dynamic cache)."""
    x = torch.randn(2, 4)
    model, other = WithTensorLiteral().eval(), WithTensorLiteral().eval()
    with torch.no_grad():
        compiled = torch.compile(model, backend="graphopt", options={"target": target})
        assert_same_outputs(model(x), compiled(x))
        # dynamo reuses the graph for the second instance: graphopt compiles it from the copy
        again = torch.compile(other, backend="graphopt", options={"target": target})
        assert_same_outputs(other(x), again(x))
    assert len(graphopt.reports()) == 2
    model.train()
    torch.compile(model, backend="graphopt", options={"target": target})(x).sum().backward()
    expected = WithTensorLiteral()
    expected.load_state_dict(model.state_dict())
    expected(x).sum().backward()
    assert_same_outputs(expected.linear.weight.grad, model.linear.weight.grad)
