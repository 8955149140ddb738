"""MetaSchedule tuning for TVM's x86 path, with a database of measured schedules kept on disk.

    tune_kernels(mods, target, budget_s=...) -> TuneResult  (what graphopt.tune runs)
    database_for(target)                     -> TuningDatabase | None  (what compile_relax applies)

Untuned, an llvm kernel gets graphopt's default schedule (`schedules.py`: fixed register
tiles, parallel, vectorized). Tuning first times each kernel's default schedule and records
it, then searches MetaSchedule's design space (multi-level tiling, parallel loops,
vectorization, unrolling) for each fused kernel of the graphs graphopt built, times candidates
on this machine, and keeps every measurement in a database. `compile_relax` applies the
database: each kernel found there gets its fastest record (the default is one of them, so
tuning never applies a schedule that measured slower), any other kernel its default schedule.

The database: one folder per target under `$GRAPHOPT_TUNE_DIR` (default
`~/.cache/graphopt/tune`; `GRAPHOPT_TUNE=0` compiles untuned without removing it), named by
the target's hash (`mcpu` and core count included):
MetaSchedule's JSON files (`database_workload.json`, `database_tuning_record.json`),
`target.json`, and `logs/` of the last run. Tuning works on a copy and swaps it in at the end
(also on Ctrl-C, keeping what was measured), so a compile never reads a half-written file;
the sha256 of the files is part of the compile cache key, so re-tuning rebuilds libraries.
Two runs at once for one target each swap in their own copy: the later one's wins.

Measuring: candidates are built in persistent worker processes (a build that hangs is killed
after `build_timeout_s`) and timed in one worker process, one at a time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm import relax
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.analysis import estimate_tir_flops
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, LocalRunner, RunnerInput

from graphopt.backends.tvm import cache, schedules
from graphopt.backends.tvm.runtime import size_thread_pool
from graphopt.progress import ProgressBar

log = logging.getLogger(__name__)

DB_FILES = ("database_workload.json", "database_tuning_record.json")
TRIALS_PER_ROUND = 16  # candidates measured per task per round (MetaSchedule's default is 64)
_SKIPPED = "not built: the tuning budget is spent"
POPULATION = 128  # evolutionary search population (default 512: too slow to score on 2 cores)


def tune_root() -> Path:
    """`$GRAPHOPT_TUNE_DIR`, else `~/.cache/graphopt/tune`."""
    configured = os.environ.get("GRAPHOPT_TUNE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "graphopt" / "tune"


def tuning_target(target: tvm.target.Target) -> tvm.target.Target:
    """`target` with "num-cores" (MetaSchedule sizes its parallel loops by it): the cores this
    process may use."""
    config = {str(k): v for k, v in target.export().items()}
    config["num-cores"] = len(os.sched_getaffinity(0))
    return tvm.target.Target(config)


def database_dir(target: tvm.target.Target, root: Path | None = None) -> Path:
    """The folder of `target`'s database (it may not exist yet)."""
    name = hashlib.sha256(str(tuning_target(target)).encode()).hexdigest()[:16]
    return (root or tune_root()) / name


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, compiles apply no tuning database (GRAPHOPT_TUNE=0): TVM's untuned
    kernels, e.g. to compare with the tuned ones in one process."""
    previous = os.environ.get("GRAPHOPT_TUNE")
    os.environ["GRAPHOPT_TUNE"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["GRAPHOPT_TUNE"]
        else:
            os.environ["GRAPHOPT_TUNE"] = previous


@dataclass(frozen=True)
class TuningDatabase:
    """A loaded database: `digest` is the sha256 of its files (part of the compile cache key)."""

    path: Path
    digest: str
    database: ms.database.JSONDatabase


def database_for(target: tvm.target.Target) -> TuningDatabase | None:
    """The tuning database for `target`, or None: no database, `GRAPHOPT_TUNE=0`, or a target
    tuning does not cover (only x86 "llvm" targets of this host are tuned). An unreadable
    database is logged as a warning and ignored (compiles stay untuned)."""
    if cache.switched_off("GRAPHOPT_TUNE"):
        return None
    if target.kind.name != "llvm" or "mtriple" in target.attrs:
        return None
    path = database_dir(target)
    try:
        stamp = tuple((s.st_mtime_ns, s.st_size) for s in (os.stat(path / f) for f in DB_FILES))
    except OSError:
        return None
    return _load(path, stamp)


@functools.lru_cache(maxsize=8)
def _load(path: Path, stamp: tuple[tuple[int, int], ...]) -> TuningDatabase | None:
    """`path`'s database; `stamp` (mtimes and sizes) makes a changed database load anew."""
    del stamp
    digest = hashlib.sha256()
    try:
        for name in DB_FILES:
            digest.update((path / name).read_bytes())
        database = _open(path, allow_missing=False)
    except (OSError, ValueError, RuntimeError) as err:
        log.warning(
            "graphopt: the TVM tuning database %s is unreadable (%s); compiling untuned. "
            "Delete the folder and run graphopt tune again.",
            path,
            err,
        )
        return None
    return TuningDatabase(path, digest.hexdigest(), database)


def _open(path: Path, allow_missing: bool) -> ms.database.JSONDatabase:
    return ms.database.JSONDatabase(
        path_workload=str(path / DB_FILES[0]),
        path_tuning_record=str(path / DB_FILES[1]),
        allow_missing=allow_missing,
    )


def apply_database(
    mod: tvm.IRModule, target: tvm.target.Target, tuning: TuningDatabase
) -> tvm.IRModule:
    """`mod` (legalized and fused) with each kernel in `tuning` given its fastest schedule."""
    with tuning_target(target), tuning.database:
        return relax.transform.MetaScheduleApplyDatabase()(mod)


def count_scheduled(mod: tvm.IRModule) -> tuple[int, int]:
    """(TIR functions in `mod`, those a schedule was applied to)."""
    funcs = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    return len(funcs), sum(1 for f in funcs if f.attrs and "tirx.is_scheduled" in f.attrs)


# ------------------------------------------------------------------------------------- tuning


@dataclass
class TaskResult:
    """One kernel: its FLOPs, how often the graphs call it, trials run, best time (None when
    no candidate was measured), and its default schedule's time (None: no rule takes it)."""

    name: str
    flop: float
    weight: int
    trials: int
    best_us: float | None
    default_us: float | None = None


@dataclass
class TuneResult:
    """What `tune_kernels` did. `stopped` is "budget", "trials" (max_trials or every task
    done) or "interrupted" (Ctrl-C: what was measured is kept)."""

    database: Path
    tasks: list[TaskResult] = field(default_factory=list)
    trials: int = 0
    defaults: int = 0  # default schedules timed by this run (earlier runs' are reused)
    seconds: float = 0.0
    stopped: str = "trials"

    @property
    def estimated_ms(self) -> float:
        """Sum over tuned kernels of weight x best time (kernels with no result excluded)."""
        return sum(t.weight * t.best_us for t in self.tasks if t.best_us is not None) / 1e3

    @property
    def default_ms(self) -> float:
        """The same sum with the default schedules' times, over the kernels that have both."""
        both = [t for t in self.tasks if t.best_us is not None and t.default_us is not None]
        return sum(t.weight * t.default_us for t in both) / 1e3

    def __str__(self) -> str:
        lines = [
            f"graphopt tune: {self.trials} trials over {len(self.tasks)} kernels in "
            f"{self.seconds:.0f}s (stopped: {self.stopped}); database {self.database}",
            f"{'kernel':<40} {'calls':>5} {'trials':>6} {'default us':>10} {'best us':>10} "
            f"{'GFLOP/s':>8}",
        ]
        for t in sorted(self.tasks, key=lambda t: -(t.best_us or 0) * t.weight):
            best = "-" if t.best_us is None else f"{t.best_us:.1f}"
            default = "-" if t.default_us is None else f"{t.default_us:.1f}"
            rate = "-" if not t.best_us else f"{t.flop / t.best_us / 1e3:.1f}"
            lines.append(
                f"{t.name[:40]:<40} {t.weight:>5} {t.trials:>6} {default:>10} {best:>10} {rate:>8}"
            )
        lines.append(
            f"sum of calls x best time: {self.estimated_ms:.2f} ms (default schedules: "
            f"{self.default_ms:.2f} ms)"
        )
        return "\n".join(lines)


def tune_kernels(
    mods: Sequence[tvm.IRModule],
    target: tvm.target.Target,
    *,
    budget_s: float,
    max_trials: int | None = None,
    progress: bool = True,
    root: Path | None = None,
    build_timeout_s: float = 60.0,
    seed: int | None = None,
) -> TuneResult:
    """Tune the kernels of `mods` (legalized, fused Relax modules, as `optimize_relax` gives)
    for `target` on this machine, and merge the measurements into the target's database.

    Args:
        budget_s: wall-clock seconds to tune; the round running at the deadline finishes.
        max_trials: stop once this many candidates were timed (the batch under way finishes;
            None: only the budget stops it).
        progress: a progress bar on stderr.
        root: the database root (default `tune_root()`).
        build_timeout_s: a candidate whose build takes longer is killed and skipped.
    Raises:
        ValueError: a target other than this host's llvm, a budget <= 0, or no kernels.
    """
    size_thread_pool()  # the measuring processes inherit it
    if target.kind.name != "llvm" or "mtriple" in target.attrs:
        raise ValueError(
            f"tuning measures on this machine, so it takes this host's target='llvm' only, "
            f"not {target}; a cross target (aarch64) or a GPU is not tuned here"
        )
    if not budget_s > 0:
        raise ValueError(f"budget_s must be > 0 seconds, got {budget_s!r}")
    if max_trials is not None and max_trials < 1:
        raise ValueError(f"max_trials must be >= 1 (or None), got {max_trials!r}")
    ttarget = tuning_target(target)
    tasks = _extract_tasks(mods, ttarget)
    if not tasks:
        raise ValueError("nothing to tune: the graphs hold no TVM kernels")

    final = database_dir(target, root)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tuning-", dir=final.parent))
    start = time.perf_counter()
    result = TuneResult(database=final)
    try:
        for name in DB_FILES:  # continue from what earlier runs measured
            if (final / name).is_file():
                shutil.copy2(final / name, work / name)
        database = _open(work, allow_missing=True)
        with _console_quiet():
            try:
                watch, result.stopped = _run_search(
                    tasks,
                    ttarget,
                    work,
                    database,
                    start,
                    start + budget_s,
                    max_trials,
                    progress,
                    seed,
                    build_timeout_s,
                )
            except BaseException:  # keep what was measured before the failure, then raise
                if database.get_all_tuning_records():
                    _commit(work, final, ttarget)
                raise
        result.trials = watch.trials
        result.tasks = [
            _task_result(database, task, trials, watch.default_s.get(i))
            for i, (task, trials) in enumerate(zip(tasks, watch.task_trials, strict=True))
        ]
        result.defaults = watch.seeded
        if watch.trials or watch.seeded:  # else nothing new (the budget spent before a build)
            _commit(work, final, ttarget)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.seconds = time.perf_counter() - start
    return result


def _import_tensor_intrinsics() -> None:
    """Import `tvm.s_tir.tensor_intrin` (a TuneContext does) in seconds rather than minutes.

    Each of its ~250 TVMScript functions calls `inspect.stack()`, which asks
    `inspect.getmodule` for every frame's module; for the import machinery's frames
    ("<frozen importlib._bootstrap>") that is a scan of all of sys.modules (thousands with
    torch loaded) per call: 76 s here. Naming their modules in inspect's own file->module
    cache (what the scan would conclude) makes it 9 s.
    """
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    for name in ("importlib._bootstrap", "importlib._bootstrap_external"):
        inspect.modulesbyfile.setdefault(f"<frozen {name}>", name)
    import tvm.s_tir.tensor_intrin  # noqa: F401


def _run_search(
    tasks: list[ms.ExtractedTask],
    target: tvm.target.Target,
    work: Path,
    database: ms.database.JSONDatabase,
    start: float,
    deadline: float,
    max_trials: int | None,
    progress: bool,
    seed: int | None,
    build_timeout_s: float,
) -> tuple[_Watch, str]:
    """MetaSchedule's evolutionary search over `tasks` into `database` until `deadline`
    (`start`: when tuning began, for the progress bar); (the watch, why it stopped)."""
    bar = ProgressBar("graphopt tune", int(deadline - start), progress, "s")
    watch = _Watch(start, deadline, bar, [float(task.weight) for task in tasks])
    builder = None
    try:
        # Each step below takes seconds to minutes whatever the budget (MetaSchedule's first
        # round samples a population for every kernel before a callback can stop it), so the
        # budget is checked before each.
        watch.check_deadline()
        builder = _WorkerBuilder(work / "build", build_timeout_s, deadline)
        runner = LocalRunner(
            timeout_sec=60.0,
            evaluator_config=EvaluatorConfig(
                number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False
            ),
        )
        bar.update(0, f"timing the default schedules of {len(tasks)} kernels")
        watch.default_s, watch.seeded = _record_default_schedules(
            tasks, target, database, builder, runner
        )
        watch.best_s.update(watch.default_s)  # the bar's sum starts from the defaults
        watch.check_deadline()
        _import_tensor_intrinsics()
        contexts, _ = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks,
            str(work),
            strategy=ms.search_strategy.EvolutionarySearch(population_size=POPULATION),
            num_threads=int(target.attrs["num-cores"]),
            seed=seed,
        )
        watch.check_deadline()
        ms.tune_tasks(
            tasks=contexts,
            task_weights=watch.weights,  # the tasks' weights, as the contexts' (one each)
            work_dir=str(work),
            max_trials_global=max_trials or 10**9,
            num_trials_per_iter=TRIALS_PER_ROUND,
            builder=builder,
            runner=runner,
            database=database,
            measure_callbacks=[
                ms.measure_callback.AddToDatabase(),
                ms.measure_callback.RemoveBuildArtifact(),
                ms.measure_callback.UpdateCostModel(),
                watch,
            ],
            task_scheduler="gradient",
        )
        stopped = "trials"
    except KeyboardInterrupt:
        stopped = "interrupted"
    except (_BudgetSpent, RuntimeError):  # RuntimeError: _BudgetSpent from TVM's C++ loop
        if not watch.out_of_time:
            raise
        stopped = "budget"
    finally:
        if builder is not None:
            builder.shutdown()
        bar.close()
    return watch, stopped


def _record_default_schedules(
    tasks: list[ms.ExtractedTask],
    target: tvm.target.Target,
    database: ms.database.JSONDatabase,
    builder: PyBuilder,
    runner: LocalRunner,
) -> tuple[dict[int, float], int]:
    """Time each kernel's default schedule (`schedules.default_schedule`, what an untuned
    compile gives it) and record it in `database` unless an earlier run did. Compiles apply
    the database's fastest record, so no schedule that measured slower than the default is
    ever applied, and the search starts from the default (the evolutionary search seeds its
    population with the database's best). ({task index: the default's seconds}, how many
    were timed now)."""
    seconds: dict[int, float] = {}
    todo = []
    for index, task in enumerate(tasks):
        mod = task.dispatched[0]
        sch = schedules.default_schedule(mod["main"], target)
        if sch is None:
            continue
        workload = database.commit_workload(mod)
        trace = str(sch.trace)
        earlier = [r for r in database.get_top_k(workload, 10**6) if str(r.trace) == trace]
        if earlier:
            seconds[index] = _mean(earlier[0].run_secs)
        else:
            # a packed weight's kernel is timed taking the weight packed (as compiled)
            args = ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
            todo.append((index, sch, workload, args))
    built = builder.build([BuilderInput(entry[1].mod, target) for entry in todo])
    runs = [
        (entry, RunnerInput(b.artifact_path, "cpu", entry[3]))
        for entry, b in zip(todo, built, strict=True)
        if b.error_msg is None
    ]
    futures = runner.run([run for _, run in runs])
    timed = 0
    for ((index, sch, workload, args), run), future in zip(runs, futures, strict=True):
        result = future.result()
        shutil.rmtree(os.path.dirname(run.artifact_path), ignore_errors=True)
        if result.error_msg is None and result.run_secs:
            record = ms.database.TuningRecord(sch.trace, workload, result.run_secs, target, args)
            database.commit_tuning_record(record)
            seconds[index] = _mean(result.run_secs)
            timed += 1
    return seconds, timed


def _extract_tasks(
    mods: Sequence[tvm.IRModule], target: tvm.target.Target
) -> list[ms.ExtractedTask]:
    """The distinct kernels of all `mods`, each with its total call count as weight. Kernels
    already scheduled are left out (MetaSchedule's tune contexts skip them, and the search's
    task ids index this list)."""
    tasks: list[ms.ExtractedTask] = []
    for mod in mods:
        for task in ms.relax_integration.extract_tasks(mod, target):
            if task.mod.attrs.get("tirx.is_scheduled", False):
                continue
            same = next(
                (t for t in tasks if tvm_ffi.structural_equal(t.dispatched[0], task.dispatched[0])),
                None,
            )
            if same is None:
                tasks.append(task)
            else:
                same.weight += task.weight
    return tasks


def _task_result(
    database: ms.database.JSONDatabase,
    task: ms.ExtractedTask,
    trials: int,
    default_s: float | None,
) -> TaskResult:
    """A task's best time in the database (earlier runs included): what compile applies."""
    mod = task.dispatched[0]
    top = database.get_top_k(database.commit_workload(mod), 1)
    best = _mean(top[0].run_secs) * 1e6 if top and top[0].run_secs else None
    return TaskResult(
        name=task.task_name,
        flop=float(estimate_tir_flops(mod)),
        weight=int(task.weight),
        trials=trials,
        best_us=best,
        default_us=None if default_s is None else default_s * 1e6,
    )


def _mean(run_secs: Sequence[Any]) -> float:
    """A measurement's seconds (MetaSchedule records one FloatImm per repeat)."""
    return sum(float(s) for s in run_secs) / len(run_secs)


def _commit(work: Path, final: Path, target: tvm.target.Target) -> None:
    """Swap the tuned copy in for `final`: check it loads, then two renames."""
    _open(work, allow_missing=False)  # raises if what was written does not load
    (work / "target.json").write_text(json.dumps({"target": str(target)}, indent=2) + "\n")
    shutil.rmtree(work / "build", ignore_errors=True)
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        final.rename(old)
    work.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _console_quiet() -> Iterator[None]:
    """MetaSchedule logs every round to stdout; keep that in the logs/ files only."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    level = logger.level
    logger.setLevel(logging.WARNING)  # its console handler takes this level
    # MetaSchedule's logging setup lists this logger's handlers by name and fails on one
    # without a name (left by an earlier run in this process).
    logger.handlers = [h for h in logger.handlers if h.get_name()]
    try:
        yield
    finally:
        logger.setLevel(level)


class _BudgetSpent(Exception):
    pass


@derived_object
class _Watch(PyMeasureCallback):
    """Counts trials, keeps each task's best time, draws the progress bar, and stops the search
    once the deadline has passed (by raising: terminating tasks from a callback breaks an
    invariant of MetaSchedule's task scheduler)."""

    def __init__(
        self, start: float, deadline: float, bar: ProgressBar, weights: Sequence[float]
    ) -> None:
        super().__init__()
        self.start, self.deadline, self.bar, self.weights = start, deadline, bar, list(weights)
        self.trials, self.out_of_time = 0, False
        self.default_s: dict[int, float] = {}  # task index -> its default schedule's seconds
        self.seeded = 0  # default schedules timed (and recorded) by this run
        self.task_trials = [0] * len(self.weights)
        self.best_s: dict[int, float] = {}  # task index -> its best seconds, defaults included

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        measured = sum(1 for b in builder_results if b.error_msg != _SKIPPED)
        self.trials += measured
        self.task_trials[task_id] += measured
        for result in runner_results:
            if result.run_secs:
                seconds = _mean(result.run_secs)
                self.best_s[task_id] = min(seconds, self.best_s.get(task_id, seconds))
        estimate = sum(self.weights[i] * s for i, s in self.best_s.items()) * 1e3
        self.bar.update(
            int(time.perf_counter() - self.start),
            f"{self.trials} trials, {len(self.best_s)}/{len(self.weights)} kernels timed, "
            f"sum {estimate:.1f} ms",
        )
        self.check_deadline()  # after AddToDatabase: these trials are kept

    def check_deadline(self) -> None:
        """Raise _BudgetSpent once the deadline has passed."""
        if time.perf_counter() > self.deadline:
            self.out_of_time = True
            raise _BudgetSpent(f"tuning budget spent after {self.trials} trials")


def _build_candidate(mod: tvm.IRModule, target: tvm.target.Target, build_dir: str) -> str:
    """(in a worker process) Compile one candidate kernel to a shared library; its path."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    library = tvm.compile(mod, target=target)
    folder = tempfile.mkdtemp(dir=build_dir)  # RemoveBuildArtifact deletes the folder
    path = os.path.join(folder, "candidate.so")
    library.export_library(path)
    return path


@derived_object
class _WorkerBuilder(PyBuilder):
    """Builds candidates in persistent worker processes.

    MetaSchedule's LocalBuilder starts new workers for every batch, and each imports
    `tvm.s_tir.tensor_intrin` (30-50 s here), so every candidate timed out. These workers
    start once (a killed one is replaced) and compile with `tvm.compile` directly.

    Past the deadline it builds nothing (MetaSchedule's first round visits every kernel
    before any measure callback can stop it; this keeps the overrun to one batch).
    """

    def __init__(self, build_dir: Path, timeout_s: float, deadline: float) -> None:
        super().__init__()
        from tvm.support.popen_pool import PopenPoolExecutor

        build_dir.mkdir(parents=True, exist_ok=True)
        self.build_dir, self.timeout_s, self.deadline = str(build_dir), timeout_s, deadline
        self.pool = PopenPoolExecutor(
            max_workers=len(os.sched_getaffinity(0)),
            timeout=timeout_s,
            maximum_process_uses=256,  # TVM's workers leak memory over many builds
        )

    def build(self, build_inputs):
        from tvm.support.popen_pool import StatusKind

        if time.perf_counter() > self.deadline:
            return [BuilderResult(None, _SKIPPED) for _ in build_inputs]
        results = []
        jobs = [(b.mod, b.target, self.build_dir) for b in build_inputs]
        for outcome in self.pool.map_with_error_catching(lambda a: _build_candidate(*a), jobs):
            if outcome.status == StatusKind.COMPLETE:
                results.append(BuilderResult(outcome.value, None))
            elif outcome.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"build timed out after {self.timeout_s}s"))
            else:
                results.append(BuilderResult(None, f"build failed: {outcome.value}"))
        return results

    def shutdown(self) -> None:
        self.pool.shutdown()
