"""OpInfo coverage must not regress: ops that compiled correctly in the baseline still do.

The baselines (`baseline_<target>[_<mode>].json`) are full sweeps of PyTorch's OpInfo database,
written by `python -m tests.opinfo.sweep --target T [--mode grad] --out tests/opinfo/...`. Here
every op that was "match" or "fallback" there is re-run, one test per op (so `pytest -n 2`
spreads them), and must still be; on "llvm" and "xla", and for gradients, an op that was
"match" must not start running in PyTorch.

What CI runs, and why (measured on the 2-core machine, cold inductor cache):
  * llvm: every baseline-passing op (629 ops, ~0.3 s each, ~3 min): the TVM rules are
    graphopt's own code, and most of its ops are one small TVM build.
  * xla: every baseline-passing op (629 ops, ~0.1-0.3 s each, under 3 min: `pytest -n 2 -k
    xla` ran its 630 tests in 174 s while another job kept the 2 cores busy; the whole sweep
    takes ~100 s with 2 workers): the XLA rules are graphopt's own code, as the TVM ones.
  * cpu: a fixed third of them, the ops with crc32(name) % 3 == 0 (~200 ops, ~1 s each, most
    of it inductor's C++ compile): the full cpu sweep alone takes ~10 min. The sample does not
    depend on the baseline's contents, and it spans every op family, so a pass that breaks
    many ops (as each regression seen while writing this did: a CSE or constant-folding bug
    hits dozens of ops) still fails here.
  * cpu gradients (training graphs: outputs and the gradient of every input, up to 6 samples
    of each op in one compile): a fixed third, crc32(name) % 3 == 1, so the forward and
    gradient samples cover different ops.
  * llvm gradients: a fixed third, crc32(name) % 3 == 2 (~175 ops; the whole sweep takes ~350
    s with 2 workers, TVM builds a forward and a backward kernel set per op). Its first sweep
    found wrong answers the forward sweep's single sample missed: NaN != x, NaN and all -inf
    rows in max/min/argmax (fixed in the TVM rules, `test_rules.py`'s "ieee_specials").
  * xla gradients: a fixed third, crc32(name) % 3 == 0 (~175 ops; all ~520 took 235 s of a
    40-minute CI run): training graphs through the XLA rules, forward and backward, against
    eager's gradients.
  * double backward: a fixed sample of 12 ops, each equal to eager or refused by torch.compile
    itself (aot_autograd has no double backward in torch 2.13), never wrong.
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
BASELINES = (
    ("cpu", "forward"),
    ("llvm", "forward"),
    ("xla", "forward"),
    ("cpu", "grad"),
    ("llvm", "grad"),
    ("xla", "grad"),
)
SAMPLE = 3  # a sampled baseline runs the ops with crc32(name) % SAMPLE == residue unless ..._FULL
# the sampled baselines (the others run whole)
RESIDUE = {("cpu", "forward"): 0, ("cpu", "grad"): 1, ("llvm", "grad"): 2, ("xla", "grad"): 0}
# Lower bounds on each baseline's "match" count (~80% of cpu 629, llvm 312, xla 476, cpu grad
# 470, llvm grad 156, xla grad 329 when written), so a baseline regenerated from a broken tree
# cannot pass; "fallback" is not counted, as an llvm sweep with no TVM rule at all would still
# have ~600 ops that fall back.
MIN_MATCH = {
    "cpu": 500,
    "llvm": 248,
    "xla": 380,
    "cpu_grad": 376,
    "llvm_grad": 124,
    "xla_grad": 263,
}
DOUBLE_BACKWARD = (
    "sin", "mul", "matmul", "nn.functional.linear", "nn.functional.layer_norm", "softmax",
    "nn.functional.gelu", "nn.functional.conv2d", "nn.functional.silu", "tanh",
    "nn.functional.cross_entropy", "nn.functional.mse_loss",
)  # fmt: skip


def _baseline(target: str, mode: str = "forward") -> dict:
    return json.loads((HERE / f"baseline_{sweep.baseline_name(target, mode)}.json").read_text())


def _in_ci_sample(target: str, mode: str, key: str) -> bool:
    if (target, mode) not in RESIDUE or os.environ.get("GRAPHOPT_OPINFO_FULL") == "1":
        return True
    return zlib.crc32(key.encode()) % SAMPLE == RESIDUE[target, mode]


def _cases() -> list:
    cases = []
    for target, mode in BASELINES:
        name = sweep.baseline_name(target, mode)
        for key, status in _baseline(target, mode)["ops"].items():
            if status in sweep.PASSING and _in_ci_sample(target, mode, key):
                cases.append(pytest.param(target, mode, key, status, id=f"{name}-{key}"))
    return cases


@pytest.fixture(scope="session")  # not module: xdist interleaves modules, restarts cost ~8 s
def runners():
    """One sweep worker per target and mode for this pytest process (a crash or hang costs
    one op)."""
    pool: dict[tuple[str, str], sweep.Runner] = {}
    yield pool
    for runner in pool.values():
        runner.close()


def _runner(runners: dict, target: str, mode: str) -> sweep.Runner:
    if (target, mode) not in runners:
        runners[target, mode] = sweep.Runner(target, mode=mode)
    return runners[target, mode]


@pytest.mark.parametrize(("target", "mode", "key", "before"), _cases())
def test_op_does_not_regress(runners, target: str, mode: str, key: str, before: str) -> None:
    outcome = _runner(runners, target, mode).classify(key)
    why = sweep.regression(target, before, outcome.status, mode)
    if why is not None:
        what = "gradients" if mode == "grad" else "outputs"
        pytest.fail(f"{key} ({what}) on target={target!r} {why}: {outcome.detail}", pytrace=False)


@pytest.mark.parametrize("key", DOUBLE_BACKWARD)
def test_double_backward_is_right_or_refused(runners, key: str) -> None:
    """Gradients of gradients through graphopt equal eager's, or torch.compile refuses them
    with its own error (as it does with inductor); never different numbers or another error."""
    outcome = _runner(runners, "cpu", "gradgrad").classify(key)
    assert outcome.status in ("match", "refused"), f"{key}: {outcome.status}: {outcome.detail}"


@pytest.mark.parametrize(("target", "mode"), BASELINES)
def test_baseline_covers_op_db(target: str, mode: str) -> None:
    """Every OpInfo of the mode is in the baseline and vice versa, and enough of them pass."""
    name = sweep.baseline_name(target, mode)
    baseline = _baseline(target, mode)
    ops = sweep.float32_ops(mode)
    missing = sorted(set(baseline["ops"]) - set(ops))
    assert not missing, f"baseline ops no longer in op_db (regenerate the baseline): {missing}"
    new = sorted(set(ops) - set(baseline["ops"]))
    assert not new, f"op_db ops missing from baseline_{name}.json (regenerate it): {new}"
    assert baseline["summary"] == sweep.summarize(baseline["ops"].values())
    matched = baseline["summary"]["match"]
    assert matched >= MIN_MATCH[name], (
        f"baseline_{name}.json has only {matched} 'match' ops (floor {MIN_MATCH[name]})"
    )
    passing = sum(status in sweep.PASSING for status in baseline["ops"].values())
    tried = [
        k
        for k, s in baseline["ops"].items()
        if s in sweep.PASSING and _in_ci_sample(target, mode, k)
    ]
    assert len(tried) >= passing // (2 * SAMPLE), f"CI tries only {len(tried)} {name} ops"
    assert set(DOUBLE_BACKWARD) <= set(sweep.float32_ops("gradgrad"))


def test_regression_rules() -> None:
    """The verdicts the per-op tests rely on, including the ones that must fail."""
    assert sweep.regression("cpu", "match", "error") is not None
    assert sweep.regression("cpu", "fallback", "mismatch") is not None
    assert sweep.regression("llvm", "match", "no-graph") is not None
    assert sweep.regression("llvm", "match", "fallback") is not None  # fallbacks must not grow
    assert sweep.regression("cpu", "match", "fallback") is None  # a new graph break on cpu
    assert sweep.regression("cpu", "match", "fallback", "grad") is not None  # backward eager
    assert sweep.regression("llvm", "fallback", "match") is None  # an improvement
    assert sweep.regression("llvm", "error", "mismatch") is None  # was not passing
    baseline = {"target": "llvm", "ops": {"abs": "match", "cos": "error", "sin": "fallback"}}
    doc = {"ops": {"abs": "error", "cos": "match"}, "details": {"abs": "KeyError: x"}}
    assert sweep.regressions(baseline, doc) == {
        "abs": "was 'match', now 'error': KeyError: x",
        "sin": "was 'fallback', now 'missing'",
    }
