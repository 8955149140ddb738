"""Calibration batches of another batch size or length than the graph's, in every entry point
(`graphopt.calibration`: re-batched along a static dim 0; `graphopt.frontend`: another length
captured dynamic; what still cannot fit named in an error)."""

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


def _bert_and_texts():
    from tests.models import tiny_bert

    torch.manual_seed(0)
    model = tiny_bert()
    ids = torch.randint(0, model.config.vocab_size, (12, 32))
    return model, ids, [(ids[i : i + 4],) for i in range(0, 12, 4)]  # 4 texts of 32 tokens


@pytest.mark.parametrize("entry", ["optimize", "export"])
def test_sequences_longer_than_the_example_calibrate_through_a_dynamic_length(entry, tmp_path):
    """A model traced for 16 tokens, calibrated on texts of 32: the length is captured dynamic
    (said in the report), every calibration batch runs, and the int8 model stays close to
    the float one at both lengths."""
    model, ids, calibration = _bert_and_texts()
    example = (ids[:1, :16],)
    options = {"quantize": "int8", "calibration": calibration}
    if entry == "optimize":
        run = graphopt.optimize(model, example, **options)
        report = run.report
    else:
        exported = graphopt.export(model, example, tmp_path / "bert", progress=False, **options)
        report, run = exported.report, graphopt.load(exported.path)
        assert isinstance(exported.manifest["inputs"][0]["shape"][1], str)  # a dynamic dim
    assert any("dim 1 of input 0" in w for w in report.warnings), report.warnings
    assert report.quantization.calibration_batches == 3 * 4  # re-batched to the example's 1
    for x in (ids[:1, :16], ids[4:5]):  # the example's length and the calibration's
        with torch.no_grad():
            want = model(x).last_hidden_state
            got = run(x)
        got = got.last_hidden_state if entry == "optimize" else got[0]
        assert graphopt.testing.relative_error(want, got) < 0.1


def test_torch_compile_with_a_length_marked_dynamic_calibrates_on_longer_sequences(caplog):
    """Under torch.compile the user makes the length dynamic (mark_dynamic); calibration
    sequences of another length then run through the graph dynamo traced."""
    from tests.models import TransformerBlock

    torch.manual_seed(0)
    model = TransformerBlock().eval()
    calibration = [(torch.randn(2, 24, 32),) for _ in range(3)]
    compiled = torch.compile(
        model, backend="graphopt", options={"quantize": "int8", "calibration": calibration}
    )
    x = torch.randn(2, 8, 32)
    torch._dynamo.mark_dynamic(x, 1)
    with torch.no_grad(), caplog.at_level("WARNING", logger="graphopt"):
        got = compiled(x)
        want = model(x)
    assert "first calls" not in caplog.text, caplog.text
    report = graphopt.reports()[-1]
    assert not report.calibration_pending and report.quantization.calibration_batches == 3
    assert graphopt.testing.relative_error(want, got) < 0.1
