"""OpInfo coverage must not regress: ops that compiled correctly in the baseline still do.

The baselines (`baseline_<target>.json`) are full sweeps of PyTorch's OpInfo database, written by
`python -m tests.opinfo.sweep --target T --out tests/opinfo/baseline_T.json`. Here every op
that was "match" or "fallback" there is re-run, one test per op (so `pytest -n 2` spreads them),
and must still be; on "llvm" an op that was "match" must not start falling back to PyTorch.

What CI runs, and why (measured on the 2-core machine, cold inductor cache):
  * llvm: every baseline-passing op (614 ops, ~0.3 s each, ~3 min): the TVM rules are
    graphopt's own code, and most of its ops are one small TVM build.
  * cpu: a fixed third of them, the ops with crc32(name) % 3 == 0 (~200 ops, ~1 s each, most
    of it inductor's C++ compile): the full cpu sweep alone takes ~10 min. The sample does not
    depend on the baseline's contents, and it spans every op family, so a pass that breaks
    many ops (as each regression seen while writing this did: a CSE or constant-folding bug
    hits dozens of ops) still fails here.
  GRAPHOPT_OPINFO_FULL=1 runs every cpu op too.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest

from . import sweep

HERE = Path(__file__).parent
TARGETS = ("cpu", "llvm")
CPU_SAMPLE = 3  # cpu runs the ops with crc32(name) % CPU_SAMPLE == 0 unless GRAPHOPT_OPINFO_FULL
# Lower bounds on each baseline's "match" count (~80% of cpu 617, llvm 293 when written), so a
# baseline regenerated from a broken tree cannot pass; "fallback" is not counted, as an llvm
# sweep with no TVM rule at all would still have ~600 ops that fall back entirely.
MIN_MATCH = {"cpu": 490, "llvm": 230}


def _baseline(target: str) -> dict:
    return json.loads((HERE / f"baseline_{target}.json").read_text())


def _in_ci_sample(target: str, key: str) -> bool:
    if target != "cpu" or os.environ.get("GRAPHOPT_OPINFO_FULL") == "1":
        return True
    return zlib.crc32(key.encode()) % CPU_SAMPLE == 0


def _cases() -> list:
    cases = []
    for target in TARGETS:
        for key, status in _baseline(target)["ops"].items():
            if status in sweep.PASSING and _in_ci_sample(target, key):
                cases.append(pytest.param(target, key, status, id=f"{target}-{key}"))
    return cases


@pytest.fixture(scope="session")  # not module: xdist interleaves modules, restarts cost ~8 s
def runners():
    """One sweep worker per target for this pytest process (a crash or hang costs one op)."""
    pool: dict[str, sweep.Runner] = {}
    yield pool
    for runner in pool.values():
        runner.close()


@pytest.mark.parametrize(("target", "key", "before"), _cases())
def test_op_does_not_regress(runners, target: str, key: str, before: str) -> None:
    if target not in runners:
        runners[target] = sweep.Runner(target)
    outcome = runners[target].classify(key)
    why = sweep.regression(target, before, outcome.status)
    if why is not None:
        pytest.fail(f"{key} on target={target!r} {why}: {outcome.detail}", pytrace=False)


@pytest.mark.parametrize("target", TARGETS)
def test_baseline_covers_op_db(target: str) -> None:
    """Every float32 OpInfo is in the baseline and vice versa, and enough of them pass."""
    baseline = _baseline(target)
    ops = sweep.float32_ops()
    missing = sorted(set(baseline["ops"]) - set(ops))
    assert not missing, f"baseline ops no longer in op_db (regenerate the baseline): {missing}"
    new = sorted(set(ops) - set(baseline["ops"]))
    assert not new, f"op_db ops missing from baseline_{target}.json (regenerate it): {new}"
    assert baseline["summary"] == sweep.summarize(baseline["ops"].values())
    matched = baseline["summary"]["match"]
    assert matched >= MIN_MATCH[target], (
        f"baseline_{target}.json has only {matched} 'match' ops (floor {MIN_MATCH[target]})"
    )
    passing = sum(status in sweep.PASSING for status in baseline["ops"].values())
    tried = [
        k for k, s in baseline["ops"].items() if s in sweep.PASSING and _in_ci_sample(target, k)
    ]
    assert len(tried) >= passing // (2 * CPU_SAMPLE), f"CI tries only {len(tried)} {target} ops"


def test_regression_rules() -> None:
    """The verdicts the per-op tests rely on, including the ones that must fail."""
    assert sweep.regression("cpu", "match", "error") is not None
    assert sweep.regression("cpu", "fallback", "mismatch") is not None
    assert sweep.regression("llvm", "match", "no-graph") is not None
    assert sweep.regression("llvm", "match", "fallback") is not None  # fallbacks must not grow
    assert sweep.regression("cpu", "match", "fallback") is None  # a new graph break on cpu
    assert sweep.regression("llvm", "fallback", "match") is None  # an improvement
    assert sweep.regression("llvm", "error", "mismatch") is None  # was not passing
    baseline = {"target": "llvm", "ops": {"abs": "match", "cos": "error", "sin": "fallback"}}
    doc = {"ops": {"abs": "error", "cos": "match"}, "details": {"abs": "KeyError: x"}}
    assert sweep.regressions(baseline, doc) == {
        "abs": "was 'match', now 'error': KeyError: x",
        "sin": "was 'fallback', now 'missing'",
    }
