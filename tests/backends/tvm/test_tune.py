"""MetaSchedule tuning: graphopt.tune measures schedules, later llvm compiles apply them.

One small tuning run (an MLP, 32 candidates) is shared by the module; each test reads what it
left in its own database folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
import tvm

import graphopt
from graphopt.backends.tvm import build, cache, schedules, target_for, tune
from graphopt.cli import main
from graphopt.config import Config

LLVM = Config(target="llvm")
TRIALS = 32  # two kernels, one round of 16 candidates each


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    ).eval()


X = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory):
    """(the TuneResult, the database root) of one tuning run of the MLP."""
    root = tmp_path_factory.mktemp("tune")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRAPHOPT_TUNE_DIR", str(root))
        env.setenv("GRAPHOPT_TUNE", "1")
        env.setenv("GRAPHOPT_CACHE", "0")
        with torch.no_grad():
            result = graphopt.tune(_mlp(), (X,), budget_s=300, max_trials=TRIALS, progress=False)
    return result, root


@pytest.fixture
def tune_env(tuned, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tuned database in effect for this test (tests/conftest.py turns tuning off)."""
    _, root = tuned
    monkeypatch.setenv("GRAPHOPT_TUNE_DIR", str(root))
    monkeypatch.setenv("GRAPHOPT_TUNE", "1")
    return root


def _kernels() -> list[tvm.IRModule]:
    """The fused, unscheduled kernels graphopt builds for the MLP (what tuning sees)."""
    with build.collect_kernels() as mods, torch.no_grad():
        graphopt.optimize(_mlp(), (X,), target="llvm")
    assert len(mods) == 1
    return mods


def test_tuning_measures_every_kernel_and_writes_the_database(tuned):
    result, root = tuned
    assert result.trials == TRIALS and result.stopped == "trials"
    names = sorted(t.name for t in result.tasks)
    assert len(names) == 2 and all("matmul" in n for n in names), names
    assert all(t.best_us is not None and t.best_us > 0 for t in result.tasks)
    assert all(t.flop > 0 and t.weight == 1 and t.trials == 16 for t in result.tasks)
    folder = result.database
    assert folder.parent == root
    assert all((folder / name).stat().st_size > 0 for name in tune.DB_FILES)
    assert "num-cores" in (folder / "target.json").read_text()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no work folder left
    text = str(result)
    assert "32 trials over 2 kernels" in text and "GFLOP/s" in text and "default us" in text


def test_default_schedules_are_timed_and_recorded_so_tuned_is_never_slower(tuned):
    """Each kernel's untuned (default) schedule is a database record: compiles apply the
    fastest record, so tuning never applies a schedule that measured slower than not tuning."""
    result, _ = tuned
    assert result.defaults == 2
    for task in result.tasks:
        assert task.default_us is not None and 0 < task.best_us <= task.default_us
    records = tune._open(result.database, allow_missing=False).get_all_tuning_records()
    assert len(records) == TRIALS + 2
    traces = {str(r.trace) for r in records}
    target = tune.tuning_target(target_for(LLVM))
    (mod,) = _kernels()
    kernels = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    defaults = [schedules.default_schedule(f, target) for f in kernels]
    assert len(defaults) == 2 and all(str(sch.trace) in traces for sch in defaults)


def test_compile_applies_the_tuned_schedules_and_matches_eager(tune_env):
    target = target_for(LLVM)
    database = tune.database_for(target)
    assert database is not None and database.path.parent == tune_env
    (mod,) = _kernels()
    kernels, tuned = tune.count_scheduled(mod)
    assert kernels >= 2 and tuned == 0
    assert tune.count_scheduled(tune.apply_database(mod, target, database)) == (kernels, 2)
    model = _mlp()
    with torch.no_grad():
        optimized = graphopt.optimize(model, (X,), target="llvm")
        graphopt.testing.assert_same_outputs(model(X), optimized(X))
    (partition,) = [p for p in optimized.report.partitions if p.target == "tvm-llvm"]
    assert partition.note == f"2/{kernels} kernels tuned"


def test_tune_off_or_other_targets_compile_untuned(tune_env, monkeypatch):
    target = target_for(LLVM)
    assert tune.database_for(target) is not None
    assert tune.database_for(target_for(Config(target="aarch64"))) is None
    monkeypatch.setenv("GRAPHOPT_TUNE", "0")
    assert tune.database_for(target) is None


def test_the_database_digest_is_part_of_the_cache_key(tune_env):
    target = target_for(LLVM)
    gm = torch.fx.symbolic_trace(lambda x: x * 2)
    for node in gm.graph.nodes:
        node.meta["val"] = X
    digest = tune.database_for(target).digest
    assert cache.graph_key(gm, LLVM, target, digest) != cache.graph_key(gm, LLVM, target, None)


def test_tuning_again_keeps_earlier_records(tuned, tune_env):
    _, root = tuned
    records = tune.database_for(target_for(LLVM)).database
    before = len(records.get_all_tuning_records())
    result = tune.tune_kernels(
        _kernels(), target_for(LLVM), budget_s=300, max_trials=16, progress=False
    )
    after = tune.database_for(target_for(LLVM)).database.get_all_tuning_records()
    assert result.trials == 16 and len(after) == before + 16  # defaults: timed once
    assert result.defaults == 0 and all(t.default_us for t in result.tasks)
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_the_budget_stops_tuning(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_TUNE_DIR", str(tmp_path))
    start = time.perf_counter()
    result = tune.tune_kernels(_kernels(), target_for(LLVM), budget_s=0.01, progress=False)
    assert result.stopped == "budget" and result.trials == 0
    assert time.perf_counter() - start < 60
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


def test_a_deadline_passing_mid_search_stops_it_and_keeps_what_was_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_TUNE_DIR", str(tmp_path))
    apply = tune._Watch._cls.apply

    def apply_then_expire(self, *args):
        self.deadline = 0.0  # the budget runs out while the first batch is measured
        return apply(self, *args)

    monkeypatch.setattr(tune._Watch._cls, "apply", apply_then_expire)
    result = tune.tune_kernels(_kernels(), target_for(LLVM), budget_s=300, progress=False)
    assert result.stopped == "budget"
    assert 0 < result.trials <= tune.TRIALS_PER_ROUND  # one batch, not the 300 s
    records = tune._open(tune.database_dir(target_for(LLVM)), allow_missing=False)
    assert len(records.get_all_tuning_records()) == result.defaults + result.trials


def test_a_failed_run_leaves_the_database_as_it_was(tune_env, monkeypatch):
    folder = tune.database_dir(target_for(LLVM))
    before = {name: (folder / name).read_bytes() for name in tune.DB_FILES}

    def broken(*args, **kwargs):
        raise RuntimeError("the search failed")

    monkeypatch.setattr(tune, "_run_search", broken)
    with pytest.raises(RuntimeError, match="the search failed"):
        tune.tune_kernels(_kernels(), target_for(LLVM), budget_s=60, progress=False)
    assert {name: (folder / name).read_bytes() for name in tune.DB_FILES} == before
    assert not [p.name for p in tune_env.iterdir() if p.name.startswith(".")]


def test_an_unreadable_database_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GRAPHOPT_TUNE_DIR", str(tmp_path))
    monkeypatch.setenv("GRAPHOPT_TUNE", "1")
    folder = tune.database_dir(target_for(LLVM))
    folder.mkdir(parents=True)
    for name in tune.DB_FILES:
        (folder / name).write_text("{ not json\n")
    with caplog.at_level(logging.WARNING):
        assert tune.database_for(target_for(LLVM)) is None
    assert "unreadable" in caplog.text and str(folder) in caplog.text


def test_bad_requests_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_TUNE_DIR", str(tmp_path))
    (mod,) = _kernels()
    with pytest.raises(ValueError, match="target='llvm' only"):
        tune.tune_kernels([mod], target_for(Config(target="aarch64")), budget_s=60)
    with pytest.raises(ValueError, match="budget_s must be > 0"):
        tune.tune_kernels([mod], target_for(LLVM), budget_s=0)
    with pytest.raises(ValueError, match="max_trials must be >= 1"):
        tune.tune_kernels([mod], target_for(LLVM), budget_s=60, max_trials=0)
    with pytest.raises(ValueError, match="tunes target='llvm'"):
        graphopt.tune(_mlp(), (X,), target="cpu")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_tune_tunes_then_times_the_tuned_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRAPHOPT_TUNE_DIR", str(tmp_path / "db"))
    monkeypatch.setenv("GRAPHOPT_TUNE", "1")
    model_file = tmp_path / "model.py"
    model_file.write_text(
        "import torch\n\ndef make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())\n"
    )
    argv = ["tune", f"{model_file}:make", "--input", "4,16", "--budget", "5m"]
    assert main([*argv, "--max-trials", "16", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "16 trials over 1 kernels" in out
    assert "tuned outputs match eager" in out and "| graphopt-llvm-tuned |" in out
    with pytest.raises(SystemExit):  # argparse rejects the budget before anything runs
        main([*argv[:-2], "--budget", "soon"])
    assert "budget must be like 600, 600s, 20m or 1h" in capsys.readouterr().err


def test_cli_budget_parses_units():
    from graphopt.cli import _budget

    assert _budget("90") == 90 and _budget("90s") == 90
    assert _budget("20m") == 1200 and _budget("1h") == 3600
    with pytest.raises(Exception, match="budget must be like"):
        _budget("soon")
    with pytest.raises(Exception, match="budget must be like"):
        _budget("-5m")


def test_benchmark_runners_compile_tuned_and_untuned(tune_env, tmp_path, monkeypatch):
    from benchmarks.runners import RUNNERS

    model = _mlp()
    with torch.no_grad():
        tuned = RUNNERS["graphopt-llvm-tuned"](model, (X,), str(tmp_path))
        untuned = RUNNERS["graphopt-llvm"](model, (X,), str(tmp_path))
        for runner in (tuned, untuned):
            graphopt.testing.assert_same_outputs(model(X), runner(X))
    notes = {
        name: [p.note for p in runner.report.partitions if p.target == "tvm-llvm"]
        for name, runner in (("tuned", tuned), ("untuned", untuned))
    }
    assert notes["tuned"][0].startswith("2/") and notes["untuned"] == [""]
    monkeypatch.setenv("GRAPHOPT_TUNE_DIR", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="no tuning database"):
        RUNNERS["graphopt-llvm-tuned"](model, (X,), str(tmp_path))
