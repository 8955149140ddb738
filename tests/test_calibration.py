"""Calibration batches of another batch size than the graph's, in every entry point
(`graphopt.calibration`: re-batched along a static dim 0; other dims named in an error)."""

from __future__ import annotations

import pytest
import torch

import graphopt
from examples.int8_digits import BATCH, accuracy
from graphopt.calibration import fit_batches


def test_a_batch_is_cut_into_pieces_of_the_graphs_batch_and_wraps_around():
    example = [torch.zeros(4, 3), torch.zeros(5)]  # a batched input and a weight-like one
    x, w = torch.arange(30.0).view(10, 3), torch.ones(5)
    pieces = fit_batches(example, [[x, w]])
    assert len(pieces) == 3  # rows 0-3, 4-7, 8-9 then 0-1
    assert torch.equal(pieces[2][0], x[[8, 9, 0, 1]])
    assert all(piece[1] is w for piece in pieces)
    assert torch.equal(fit_batches(example, [[x[:2], w]])[0][0], x[[0, 1, 0, 1]])  # smaller
    same = [torch.zeros(4, 3), w]
    assert fit_batches(example, [same])[0][0] is same[0]  # a batch that fits is kept


def test_dynamic_dims_take_any_size():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    fake = mode.from_tensor(torch.zeros(4, 3), static_shapes=False)
    batch = [torch.zeros(7, 3)]
    assert fit_batches([fake], [batch])[0][0] is batch[0]


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([torch.zeros(8, 5)], r"input 0 is \(8, 5\), the graph was traced for \(4, 3\): only "
         r"the batch dim \(dim 0\) is re-batched; give batches whose dims \[1\] match"),
        ([torch.zeros(8, 3), torch.zeros(1)], "has 2 inputs, the graph takes 1"),
        ([torch.zeros(3)], r"input 0 is \(3,\), the graph's input 0 is \(4, 3\)"),
        ([torch.zeros(0, 3)], "calibration batch 0 is empty"),
    ],
)  # fmt: skip
def test_what_cannot_be_fitted_is_named(batch, message):
    with pytest.raises(ValueError, match=message):
        fit_batches([torch.zeros(4, 3)], [batch])


def test_optimize_for_one_image_calibrates_on_batches_of_100(digits):
    models, calibration, test = digits
    model = models["mlp"]
    optimized = graphopt.optimize(
        model, (calibration[0][0][:1],), quantize="int8", calibration=calibration
    )
    assert optimized.report.quantization.calibration_batches == 4 * BATCH
    image = test[0][:1]
    with torch.no_grad():
        assert torch.allclose(model(image), optimized(image), atol=0.5)
    float_acc = accuracy(model, test)
    int8_acc = sum(
        int(optimized(x[None]).argmax(1).item() == int(y)) for x, y in zip(*test)
    ) / len(test[1]) * 100  # fmt: skip
    assert int8_acc >= float_acc - 1.0, (float_acc, int8_acc)


def test_torch_compile_uses_batches_of_another_size_than_the_calls(digits, caplog):
    models, calibration, test = digits
    model = models["mlp"]
    small = [(c[0][:10],) for c in calibration]  # the model is called with 100 images
    compiled = torch.compile(
        model, backend="graphopt", options={"quantize": "int8", "calibration": small}
    )
    with torch.no_grad(), caplog.at_level("WARNING", logger="graphopt"):
        compiled(test[0][:BATCH])
    assert "first" not in caplog.text and "does not" not in caplog.text
    report = graphopt.reports()[-1]
    assert not report.calibration_pending and report.quantization.calibration_batches == 4
    assert accuracy(compiled, test) >= accuracy(model, test) - 1.0


def test_torch_compile_with_batches_of_another_image_size_says_why_it_calibrates_on_calls(
    caplog,
):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    compiled = torch.compile(
        model,
        backend="graphopt",
        options={"quantize": "int8", "calibration": [(torch.randn(4, 1, 4, 4),)] * 3},
    )
    with torch.no_grad(), caplog.at_level("WARNING", logger="graphopt"):
        compiled(torch.randn(2, 1, 8, 8))
    assert "only the batch dim (dim 0) is re-batched" in caplog.text
    assert "calibrating on the first calls instead" in caplog.text
    assert graphopt.reports()[-1].calibration_pending == 2  # 3 calls, as many as the batches


def test_hls_export_for_one_image_calibrates_on_batches_of_100(digits, tmp_path):
    """The issue's case: an FPGA artifact is exported for one image (static shapes) and
    calibrated on the training batches."""
    models, calibration, test = digits
    image = test[0][:1]
    exported = graphopt.export(
        models["mlp"], (image,), tmp_path / "mlp", format="hls", quantize="int8",
        calibration=calibration, progress=False,
    )  # fmt: skip
    assert exported.manifest["hls"]["csim"]["max_abs_difference_vs_int8_reference"] == 0
