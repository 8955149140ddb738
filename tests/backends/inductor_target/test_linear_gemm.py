"""target="cpu": each fp32 linear runs on the GEMM library (MKL or oneDNN) faster on this host."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import graphopt
from graphopt.backends import inductor
from graphopt.testing import assert_same_outputs
from tests.models import MLP, tiny_bert

pytestmark = pytest.mark.skipif(
    not (torch._C.has_mkl and torch.backends.mkldnn.is_available()),
    reason="the choice is between MKL's and oneDNN's GEMM: this torch lacks one of them",
)


@pytest.mark.parametrize("onednn_faster", [True, False])
@pytest.mark.parametrize("make, shape", [(MLP, (4, 32)), (tiny_bert, (2, 8))])
def test_each_linear_runs_on_the_library_chosen_and_matches_eager(
    monkeypatch, onednn_faster, make, shape
):
    monkeypatch.setattr(inductor, "_onednn_faster", lambda m, k, n: onednn_faster)
    model = make().eval()
    x = torch.randint(0, 100, shape) if make is tiny_bert else torch.randn(shape)
    opt, code = run_and_get_code(graphopt.optimize, model, (x,))
    code = "\n".join(code)
    with torch.no_grad():
        assert_same_outputs(model(x), opt(x))
    onednn, mkl = code.count("_linear_pointwise("), code.count("_mkl_linear(")
    note = opt.report.partitions[0].note
    if onednn_faster:
        assert onednn > 0 and mkl == 0, code
        assert f"{onednn} on oneDNN's (m x k x n: " in note and note.endswith(", 0 on MKL's")
    else:
        assert mkl > 0 and onednn == 0, code
        assert note.endswith(f": 0 on oneDNN's, {mkl} on MKL's")


def test_the_faster_library_is_timed_once_per_shape(monkeypatch):
    monkeypatch.setattr(inductor, "_ONEDNN_FASTER", {})
    first = inductor._onednn_faster(4, 32, 16)
    assert isinstance(first, bool)
    assert list(inductor._ONEDNN_FASTER) == [(4, 32, 16, torch.get_num_threads())]
    inductor._ONEDNN_FASTER[4, 32, 16, torch.get_num_threads()] = not first
    assert inductor._onednn_faster(4, 32, 16) is (not first), "the cached choice, not timed again"


def test_training_graphs_keep_inductors_gemm():
    settings = inductor._settings(torch.fx.symbolic_trace(MLP()), [torch.randn(4, 32)], True)
    assert "post_grad_custom_pre_pass" not in settings
