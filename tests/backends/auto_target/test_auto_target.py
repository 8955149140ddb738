"""target="auto": every engine compiles the graph, is checked and timed; the fastest is kept,
the choice cached on disk; GRAPHOPT_AUTO forces one; failing candidates are named, skipped."""

import json

import pytest
import torch

import graphopt
from graphopt.backends import auto
from graphopt.backends.base import Compiled
from graphopt.testing import assert_same_outputs, relative_error
from tests.models import MLP, ResidualCNN


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE", "1")  # the suite's conftest turns caches off
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "tvm"))
    monkeypatch.delenv("GRAPHOPT_AUTO", raising=False)
    return tmp_path / "graphopt-auto"


def _note(report):
    (partition,) = report.partitions
    assert partition.target == "auto" and not report.fallbacks
    return partition.note


def test_the_fastest_checked_engine_is_kept_and_the_choice_cached(cache_dir):
    model, x = ResidualCNN().eval(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        compiled = torch.compile(model, backend="graphopt", options={"target": "auto"})
        assert_same_outputs(model(x), compiled(x))
    note = _note(graphopt.reports()[-1])
    assert note.startswith("auto: chose ")
    for engine in auto.available():  # every candidate with its time, error and compile time
        assert f"{engine} " in note and "ms, error" in note and "compile" in note
    (entry,) = cache_dir.glob("*.json")
    record = json.loads(entry.read_text())
    times = {c["engine"]: c["median_ms"] for c in record["candidates"]}
    assert record["engine"] == min(times, key=times.get)  # the fastest
    assert note.startswith(f"auto: chose {record['engine']} ")
    torch._dynamo.reset()  # a new compile (as in another process) reads the choice
    with torch.no_grad():
        again = torch.compile(model, backend="graphopt", options={"target": "auto"})
        assert_same_outputs(model(x), again(x))
    note = _note(graphopt.reports()[-1])
    assert (
        note == f"auto: {record['engine']} (measured before, cached); loaded from the compile cache"
    )


def test_graphopt_auto_forces_an_engine_and_a_bad_one_is_named(monkeypatch):
    model, x = MLP().eval(), torch.randn(4, 32)
    monkeypatch.setenv("GRAPHOPT_AUTO", "openvino")
    fast = graphopt.optimize(model, (x,), target="auto")
    with torch.no_grad():
        assert_same_outputs(model(x), fast(x))
    assert _note(fast.report) == "auto: openvino (forced by GRAPHOPT_AUTO)"
    monkeypatch.setenv("GRAPHOPT_AUTO", "tpu")
    with pytest.raises(ValueError, match=r"GRAPHOPT_AUTO='tpu'; accepted values: \['cpu'"):
        graphopt.optimize(model, (x,), target="auto")


def test_candidates_that_fail_or_give_other_numbers_are_skipped_and_named(monkeypatch):
    from graphopt import targets

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this")

    def wrong(self, data, example_inputs):
        return Compiled(lambda *args: (torch.zeros(4, 10),))

    # both read the one ONNX export of the graph (`from_onnx`)
    monkeypatch.setattr(type(targets.backend("onnx")), "from_onnx", broken)
    monkeypatch.setattr(type(targets.backend("openvino")), "from_onnx", wrong)
    model, x = MLP().eval(), torch.randn(4, 32)
    fast = graphopt.optimize(model, (x,), target="auto")
    note = _note(fast.report)
    assert note.startswith("auto: chose cpu ")
    assert "onnx skipped (RuntimeError: no kernel for this)" in note
    assert "openvino skipped (relative error 1.0e+00 > 0.001)" in note
    with torch.no_grad():
        assert_same_outputs(model(x), fast(x))


def test_training_graphs_go_to_inductor():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    reference = torch.nn.Sequential(
        torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    )
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 32)
    compiled = torch.compile(model, backend="graphopt", options={"target": "auto"})
    compiled(x).sum().backward()
    reference(x).sum().backward()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    assert any(
        "auto: inductor (training graphs)" in p.note for p in graphopt.reports()[-1].partitions
    )


def test_int8_graphs_are_one_qdq_graph_for_every_engine():
    model, x = ResidualCNN().eval(), torch.randn(2, 3, 16, 16)
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    fast = graphopt.optimize(model, (x,), target="auto", quantize="int8", calibration=calibration)
    note = _note(fast.report)
    assert fast.report.quantization.layers and note.startswith("auto: chose ")
    assert "skipped" not in note, note  # every engine runs the QDQ graph to its numbers
    on_onnx = graphopt.optimize(
        model, (x,), target="onnx", quantize="int8", calibration=calibration
    )
    with torch.no_grad():
        assert relative_error(on_onnx(x), fast(x)) < 0.02  # the same int8 graph


def test_weight_only_quantization_is_refused_with_the_accepted_values():
    with pytest.raises(ValueError, match="auto"):
        graphopt.optimize(MLP().eval(), (torch.randn(4, 32),), target="auto",
                          quantize="int8_weight_only")  # fmt: skip


def test_onnxruntime_and_openvino_share_one_onnx_export(monkeypatch):
    from graphopt.backends import onnx

    calls = []
    export = onnx.export_onnx
    monkeypatch.setattr(onnx, "export_onnx", lambda *a, **k: calls.append(1) or export(*a, **k))
    graphopt.optimize(MLP().eval(), (torch.randn(4, 32),), target="auto")
    assert len(calls) == 1
