"""Smoke test of the benchmark suite (benchmarks/run.py) on its tiny models."""

from __future__ import annotations

import math
import time

import pytest
import torch

from benchmarks import run
from benchmarks.models import CALIBRATION_BATCHES, MODELS, TINY
from benchmarks.runners import INT8_ANCHORS, INT8_RUNNERS, RUNNERS, eager
from graphopt.bench import Timing

FAST_RUNNERS = ["eager", "inductor", "onnxruntime", "graphopt-cpu"]


def _broken(model, inputs, workdir):
    raise RuntimeError("boom")


def _slow(model, inputs, workdir):
    out = model(*inputs)  # computed once: a loaded machine only stretches the sleep, not a model

    def call(*args):
        time.sleep(0.05)
        return out

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


def test_xla_runner_runs_every_node_in_xla_and_matches_eager():
    import jax  # the test extra installs it (the `xla` extra's jax): never skipped

    import graphopt

    platform = f"XLA:{jax.devices()[0].platform.upper()}, jax {jax.__version__}"

    results = run.run_suite(TINY, ["eager", "graphopt-xla"], rounds=1, warmup=0, budget_s=30)
    for result in results:
        table = run.format_model(result)
        xla = result.runners[1]
        assert xla.name == "graphopt-xla" and not xla.failed, (xla.note, table)
        assert xla.max_error < 1e-3 * max(1.0, result.output_scale), table
        assert xla.rel_error < 1e-4, table
        assert xla.note == platform, table  # one graph, no node in PyTorch
        timing = next(t for t in result.timings if t.name == "graphopt-xla")
        assert math.isfinite(timing.median_ms) and timing.median_ms > 0, table
        assert _rows(table)["graphopt-xla"][1].endswith("x")  # speed vs eager
    reports = graphopt.reports()
    assert len(reports) == len(TINY) and all(not r.fallbacks for r in reports)
    assert {p.target for r in reports for p in r.partitions} == {"xla"}


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


def test_each_timed_call_waits_for_the_previous_engines_threads_to_settle():
    from graphopt.bench import compare_speed

    calls: list[tuple[float, float]] = []

    def runner(*args):
        start = time.perf_counter()
        time.sleep(0.001)
        calls.append((start, time.perf_counter()))

    timings = compare_speed({"a": runner, "b": runner}, (), rounds=3, warmup=0, settle_s=0.03)
    assert [len(t.samples_ms) for t in timings] == [3, 3]
    gaps = [start - prev_end for (_, prev_end), (start, _) in zip(calls, calls[1:])]
    assert len(gaps) == 5 and min(gaps) >= 0.03


def test_unknown_runner_is_rejected():
    with pytest.raises(SystemExit, match="accepted"):
        run.main(["--smoke", "--runners", "eager,nope"])


def test_eager_runner_is_the_model():
    model = object()
    assert eager(model, (), "") is model


def _header(table: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith("| runner |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.slow
def test_int8_runners_are_close_to_eager_and_compared_to_int8_anchors():
    results = run.run_suite(
        TINY, ["eager", "graphopt-cpu", *INT8_RUNNERS], rounds=1, warmup=0, budget_s=30
    )
    for result in results:
        table = run.format_model(result)
        for name in INT8_RUNNERS:
            runner = next(r for r in result.runners if r.name == name)
            assert not runner.failed, (name, runner.note)
            # int8 is lossy but close: a few percent (a broken quantization is 30% or more off)
            assert 0 < runner.rel_error < 0.1, (name, table)
            assert "SUSPECT" not in runner.note
        int8_anchor = result.int8_anchor()
        assert int8_anchor in INT8_ANCHORS
        header = _header(table)
        ratios = [f"speed vs {int8_anchor}", "speed vs graphopt-cpu"]
        assert set(ratios + ["rel L2 err", "max abs err"]) <= set(header), table
        row = _rows(table)["graphopt-cpu-int8"]
        for column in ratios:
            assert row[header.index(column) - 1].endswith("x"), (column, table)
        assert f"fastest int8 anchor: {int8_anchor}" in table
    summary = run.format_int8_summary(results)
    lines = [line for line in summary.splitlines() if "| graphopt-cpu-int8 |" in line]
    assert len(lines) == len(TINY), summary
    assert all(line.rstrip(" |").endswith("x") for line in lines), summary  # vs graphopt-cpu
    report = run.format_report(results, run.machine_description("pytest"), "settings")
    assert "## int8: speed vs the fastest int8 anchor" in report and summary in report


def _scaled(factor):
    def build(model, inputs, workdir, *, calibration):
        assert len(calibration) == CALIBRATION_BATCHES
        assert all(not torch.equal(batch[0], inputs[0]) for batch in calibration)
        return lambda *args: model(*args) * factor

    return build


@pytest.mark.parametrize(("factor", "suspect"), [(1.02, False), (0.0, True)])
def test_int8_error_flags_broken_not_lossy(monkeypatch, factor, suspect):
    monkeypatch.setitem(RUNNERS, "pt2e-int8", _scaled(factor))
    (result,) = run.run_suite(["tiny-cnn"], ["eager", "pt2e-int8"], rounds=1, warmup=0)
    runner = result.runners[1]
    assert runner.rel_error == pytest.approx(abs(1 - factor), rel=1e-4)
    assert ("SUSPECT" in runner.note) is suspect
    assert run.format_model(result).count("SUSPECT") == int(suspect)


def test_calibration_batches_are_drawn_like_the_input():
    for name in ("tiny-cnn", "tiny-bert", "bert-base"):
        bm = MODELS[name]
        (x,), batches = bm.inputs(), bm.calibration()
        assert len(batches) == CALIBRATION_BATCHES
        for (c,), (again,) in zip(batches, bm.calibration()):
            assert c.shape == x.shape and c.dtype == x.dtype
            assert torch.equal(c, again) and not torch.equal(c, x)
        assert len({b[0].sum().item() for b in batches}) == len(batches)
    assert MODELS["bert-base"].calibration()[0][0].max() > 1000  # token ids over the vocab


def test_stages_benchmark_prints_each_split_and_its_timing(capsys):
    from benchmarks import stages

    assert stages.main(["--devices", "cpu,cpu", "--batch", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "['cpu', 'cpu']: compile" in out and "2 stages, imbalance" in out
    assert "| eager-cpu |" in out and "| cpu+cpu |" in out
    error = float(out.split("max abs error ")[1].split()[0])
    assert error < 1e-4


def test_each_int8_runner_is_measured_against_the_fp32_of_its_own_entry():
    medians = {
        "eager": 40.0,
        "graphopt-cpu": 10.0,
        "graphopt-cpu-optimize": 8.0,
        "onnxruntime-int8": 6.0,
        "graphopt-cpu-int8": 5.0,
        "graphopt-cpu-int8-optimize": 4.0,
    }
    result = run.ModelResult(
        "m",
        [run.RunnerResult(name, rel_error=0.01) for name in medians],
        [Timing(name, ms, [ms]) for name, ms in medians.items()],
        1.0,
    )
    rows = {
        line.split("|")[2].strip(): [c.strip() for c in line.strip(" |").split("|")]
        for line in run.format_int8_summary([result]).splitlines()[2:]
    }
    assert rows["graphopt-cpu-int8"][-2:] == ["graphopt-cpu", "2.00x"]
    assert rows["graphopt-cpu-int8-optimize"][-2:] == ["graphopt-cpu-optimize", "2.00x"]
    header = _header(run.format_model(result))
    assert {"speed vs graphopt-cpu", "speed vs graphopt-cpu-optimize"} <= set(header)


def test_stolen_cpu_time_is_read_from_proc_stat_and_flags_the_table(tmp_path):
    from graphopt.bench import cpu_steal, stolen_share

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n")
    before = cpu_steal(str(stat))
    assert before == (40, 1000)
    stat.write_text("cpu  200 0 60 900 10 0 0 70 0 0\n")  # 30 of 240 more ticks stolen
    assert stolen_share(before, cpu_steal(str(stat))) == 0.125
    assert cpu_steal(str(tmp_path / "missing")) is None
    assert math.isnan(stolen_share(None, before))

    timings = [Timing("eager", 10.0, [10.0])]
    calm = run.ModelResult("m", [run.RunnerResult("eager")], timings, 1.0, stolen=0.004)
    busy = run.ModelResult("m", [run.RunnerResult("eager")], timings, 1.0, stolen=0.125)
    assert "while timing: 0.4%" in run.format_model(calm)
    assert "suspect" not in run.format_model(calm)
    assert "while timing: 12.5% (**timings suspect**" in run.format_model(busy)


def test_charts_are_drawn_from_a_results_table():
    from benchmarks.chart import bar_svg, table_column

    text = (
        "# x\n\n## llama\n\n| runner | decode tok/s b1 | note |\n|---|---:|---|\n"
        "| eager | 18.9 | |\n| graphopt-int8 | 109.1 | |\n| broken | - | failed |\n\nafter\n"
    )
    rows = table_column(text, "decode tok/s b1", section="llama")
    assert rows[:2] == [("eager", 18.9), ("graphopt-int8", 109.1)] and math.isnan(rows[2][1])
    svg = bar_svg("decode", rows, "tokens/s")
    assert svg.count("<rect") == 1 + 2  # the background and one bar per number
    assert "graphopt-int8" in svg and "broken" not in svg
    with pytest.raises(ValueError, match="no table with a column 'prefill'"):
        table_column(text, "prefill")


def test_line_charts_draw_each_series_and_the_published_points():
    from benchmarks.chart import line_svg

    svg = line_svg(
        "scaling",
        {"a overlap": [(8, 0.9), (64, 0.8)], "a no overlap": [(8, 0.8), (64, 0.6)]},
        x_label="GPUs",
        y_label="efficiency",
        points={"a published": [(64, 0.7)]},
        dashed=frozenset({"a no overlap"}),
    )
    assert svg.count("<polyline") == 2 and svg.count("stroke-dasharray") == 2  # line, legend
    assert svg.count('width="8" height="8"') == 2  # the point and its legend mark
    with pytest.raises(ValueError, match="nothing to draw"):
        line_svg("empty", {"a": []}, x_label="x", y_label="y")


def test_plan_scaling_simulates_the_published_clusters(tmp_path):
    from benchmarks import plan_scaling

    assert plan_scaling.main(["--out", str(tmp_path / "scaling.md")]) == 0
    text = (tmp_path / "scaling.md").read_text()
    assert text.count("| VGG-16 |") == 2 + 2  # two published points, two curves
    assert (tmp_path / "scaling.svg").read_text().count("<polyline") == 2 * len(plan_scaling.MODELS)
    # the curves fall with the GPU count, and overlap never predicts less
    for model in plan_scaling.MODELS:
        slow, fast = (plan_scaling.efficiency(model, o) for o in (False, True))
        assert all(slow[n] <= fast[n] for n in plan_scaling.GPUS)
        assert slow[1024] < slow[8] <= 1.0


def test_overhead_measures_every_layer_for_every_engine(tmp_path):
    from benchmarks import overhead

    assert overhead.main(["--calls", "20", "--repeats", "1", "--out", str(tmp_path / "o.md")]) == 0
    text = (tmp_path / "o.md").read_text()
    for layer in overhead.LAYERS:
        assert f"| linear | {layer} |" in text and f"| mobilenet_v2 | {layer} |" in text
    results = overhead.measure(calls=20, repeats=1)
    assert set(results) == set(overhead.ENGINES) == {"onnxruntime", "openvino", "xla"}
    assert all(us > 0 for layers in results.values() for us in layers.values())
