"""Smoke test of the benchmark suite (benchmarks/run.py) on its tiny models."""

from __future__ import annotations

import math
import time

import pytest

from benchmarks import run
from benchmarks.models import TINY
from benchmarks.runners import RUNNERS, eager

FAST_RUNNERS = ["eager", "inductor", "onnxruntime", "graphopt-cpu"]


def _broken(model, inputs, workdir):
    raise RuntimeError("boom")


def _slow(model, inputs, workdir):
    def call(*args):
        time.sleep(0.05)
        return model(*args)

    return call


def _slow_compile(model, inputs, workdir):
    time.sleep(5)
    return model


@pytest.fixture
def extra_runners(monkeypatch):
    for name, builder in {"broken": _broken, "slow": _slow, "slow-compile": _slow_compile}.items():
        monkeypatch.setitem(RUNNERS, name, builder)


def _rows(table: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_suite_times_every_runner_and_reports_failures(extra_runners):
    results = run.run_suite(TINY, [*FAST_RUNNERS, "broken"], rounds=1, warmup=0, budget_s=30)
    assert [r.model for r in results] == list(TINY)
    for result in results:
        table = run.format_model(result)
        rows = _rows(table)
        assert list(rows) == [*FAST_RUNNERS, "broken"]
        for name in FAST_RUNNERS:
            timing = next(t for t in result.timings if t.name == name)
            assert math.isfinite(timing.median_ms) and timing.median_ms > 0, (name, table)
            runner = next(r for r in result.runners if r.name == name)
            assert not runner.failed, (name, runner.note)
            assert math.isfinite(runner.compile_s)
            assert runner.max_error < 1e-3 * max(1.0, result.output_scale), (name, table)
            assert rows[name][1].endswith("x")  # speed vs eager
        assert result.anchor() in ("inductor", "onnxruntime")
        broken = next(r for r in result.runners if r.name == "broken")
        assert broken.failed and broken.note == "does not run: RuntimeError: boom"
        assert rows["broken"][0] == "-" and rows["broken"][-1] == broken.note
    report = run.format_report(results, run.machine_description("pytest"), "settings")
    assert "| graphopt-cpu |" in report and "CPU:" in report


def test_budgets_cap_slow_runners(extra_runners):
    (result,) = run.run_suite(
        ["tiny-cnn"],
        ["eager", "slow", "slow-compile"],
        rounds=5,
        warmup=1,
        budget_s=0.12,
        compile_budget_s=0.5,
    )
    slow, slow_compile = result.runners[1:]
    assert len(slow.samples_ms) == 2 and "2 round(s)" in slow.note  # 0.12 s / 0.05 s a call
    assert slow_compile.failed and "CompileBudgetExceeded" in slow_compile.note
    assert slow_compile.compile_s < 2


def test_unknown_runner_is_rejected():
    with pytest.raises(SystemExit, match="accepted"):
        run.main(["--smoke", "--runners", "eager,nope"])


def test_eager_runner_is_the_model():
    model = object()
    assert eager(model, (), "") is model
