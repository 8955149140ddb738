"""Pruning end to end: torch.compile and torch.export graphs alike, every backend, and
prune + recover on real data (scikit-learn's digits)."""

import pytest
import torch

import graphopt
from graphopt.testing import assert_same_outputs
from tests.models import ResidualCNN
from tests.passes.test_prune import kill_upper_half

HALF = {"sparsity": 0.5, "structured": True}


def _dead_half_resnet():
    torch.manual_seed(0)
    return kill_upper_half(ResidualCNN(width=8), keep=("fc",))


def _shapes(report):
    return [(layer.layer.split(" (")[0], layer.shape_after) for layer in report.pruning.layers]


def test_torch_compile_and_export_prune_the_same_channels():
    model = _dead_half_resnet()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, backend="graphopt", options=HALF)
    with torch.no_grad():
        assert_same_outputs(model(x), compiled(x))
    (dynamo_report,) = graphopt.reports()
    optimized = graphopt.optimize(model, (x,), **HALF)
    with torch.no_grad():
        assert_same_outputs(model(x), optimized(x))
    assert _shapes(dynamo_report) == _shapes(optimized.report)
    assert dict(_shapes(optimized.report))["stem.0"] == (4, 3, 3, 3)
    assert optimized.report.params_after < 0.3 * optimized.report.params_before
    assert "prune: 50% of the channels" in str(optimized.report)


@pytest.mark.parametrize("target", ["llvm", "onnx"])
def test_pruned_graph_runs_on_other_backends(target):
    model = _dead_half_resnet()
    x = torch.randn(2, 3, 16, 16)
    optimized = graphopt.optimize(model, (x,), target=target, **HALF)
    with torch.no_grad():
        assert_same_outputs(model(x), optimized(x))
    assert optimized.report.pruning.groups_pruned == 4


def test_training_graphs_are_not_pruned():
    model = ResidualCNN(width=8).train()
    compiled = torch.compile(model, backend="graphopt", options=HALF)
    x = torch.randn(2, 3, 16, 16)
    compiled(x).sum().backward()
    reports = graphopt.reports()
    assert reports and all(r.pruning is None for r in reports)
    assert any("this training graph is not pruned" in w for r in reports for w in r.warnings)


def test_prune_returns_a_trainable_module_with_a_dynamic_batch():
    model = _dead_half_resnet()
    pruned = graphopt.prune(model, (torch.randn(2, 3, 16, 16),), **HALF)
    params = list(pruned.parameters())
    assert params and all(p.requires_grad for p in params)
    assert len({id(p) for p in params}) == len(params)
    # every layer trains its own weights, even those CSE found equal (zero biases here)
    assert len(params) == 2 * len(pruned.report.pruning.layers)
    for batch in (1, 5):  # other batch sizes than the example's
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert_same_outputs(model(x), pruned(x))
    pruned(torch.randn(3, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in params)


def test_prune_and_recover_reject_what_they_cannot_do():
    model = ResidualCNN(width=8).eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="needs sparsity > 0"):
        graphopt.prune(model, (x,), structured=True)
    with pytest.raises(ValueError, match="quantize or partition it afterwards"):
        graphopt.prune(model, (x,), quantize="int8", **HALF)
    compiled = graphopt.optimize(model, (x,), **HALF)
    with pytest.raises(ValueError, match="no trainable parameters"):
        graphopt.recover(compiled, teacher=model, data=[x])
    pruned = graphopt.prune(model, (x,), **HALF)
    with pytest.raises(ValueError, match=r"accepted values: \['kl', 'mse'\]"):
        graphopt.recover(pruned, teacher=model, data=[x], loss="l1")
    with pytest.raises(ValueError, match="data gave no batches"):
        graphopt.recover(pruned, teacher=model, data=[], steps=2)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_digits_half_the_channels_plus_recover_loses_at_most_one_point(digits, kind):
    """The issue's acceptance test: 50% structured pruning + distillation on real data."""
    from examples.int8_digits import accuracy, load_digits_split

    models, calibration, test = digits
    teacher = models[kind]
    images = load_digits_split()[0][0]  # the training images, without their labels
    train_images = [images[i : i + 64] for i in range(0, len(images), 64)]
    pruned = graphopt.prune(teacher, (test[0][:2],), **HALF)
    assert pruned.report.pruning.groups_pruned == 2
    result = graphopt.recover(
        pruned, teacher=teacher, data=train_images, steps=400, lr=5e-3, eval_data=test
    )
    print(f"\ndigits {kind}: {result}")
    assert result.top1_before < result.teacher_top1 - 0.05  # pruning alone costs accuracy
    assert result.top1_after >= result.teacher_top1 - 0.01
    assert result.loss_last < result.loss_first
    # the recovered model compiles like any other, in int8 too
    x = test[0][:100]
    int8 = graphopt.optimize(pruned, (x,), quantize="int8", calibration=calibration)
    assert accuracy(int8, test) >= 100 * result.teacher_top1 - 2.0
    with torch.no_grad():
        assert not torch.allclose(int8(x), pruned(x))  # it really runs int8
