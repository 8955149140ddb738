import os

import pytest
import torch

import graphopt


@pytest.fixture(scope="session", autouse=True)
def _aarch64_runner_dir(tmp_path_factory):
    """The aarch64 runner (built on first use) goes to one folder that all xdist workers share
    (they take turns through build_runner's lock), not to ~/.cache; $GRAPHOPT_RUNNER_DIR, when
    set, is used as it is (e.g. to reuse a build across runs)."""
    if "GRAPHOPT_RUNNER_DIR" not in os.environ:
        shared = tmp_path_factory.getbasetemp().parent / "aarch64-runner"
        os.environ["GRAPHOPT_RUNNER_DIR"] = str(shared)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits (real data): ({"mlp", "cnn"}: models trained here, 4 calibration
    batches of training images, (test images, labels)), as in examples/int8_digits.py."""
    from examples.int8_digits import BATCH, DigitsCNN, DigitsMLP, load_digits_split, train

    train_data, test = load_digits_split()
    torch.manual_seed(0)  # the same initial weights whichever test asks first
    models = {"mlp": train(DigitsMLP(), train_data), "cnn": train(DigitsCNN(), train_data)}
    calibration = [(train_data[0][i : i + BATCH],) for i in range(0, 4 * BATCH, BATCH)]
    return models, calibration, test


@pytest.fixture(autouse=True)
def _fresh_compile_state(monkeypatch):
    """dynamo reuses compiled graphs across instances of one class: reset between tests.

    The TVM disk cache is off (tests compile for real and leave ~/.cache alone);
    tests/backends/tvm/test_cache.py turns it on in a tmp folder. So is the TVM tuning
    database (a user's tuned schedules must not change what tests compile);
    tests/backends/tvm/test_tune.py tunes into a tmp folder.
    """
    monkeypatch.setenv("GRAPHOPT_CACHE", "0")
    monkeypatch.setenv("GRAPHOPT_TUNE", "0")
    torch._dynamo.reset()
    graphopt.clear_reports()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    try:
        import tvm

        has_gpu = tvm.cuda(0).exist
    except Exception:  # noqa: BLE001 - no TVM or no CUDA runtime: no GPU for TVM
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU visible to TVM")
    for item in items:
        if "needs_gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)
    _mark_qemu_tests(items)


def _mark_qemu_tests(items):
    """needs_qemu tests run aarch64 libraries under qemu-aarch64-static. Without the Debian
    packages they skip, naming them; with GRAPHOPT_REQUIRE_QEMU=1 (set by .ci/run, which
    installs them) they run regardless, so CI can never skip them."""
    from graphopt.backends.tvm.aarch64 import missing_tools

    if os.environ.get("GRAPHOPT_REQUIRE_QEMU") == "1":
        return
    missing = missing_tools()
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"needs the aarch64 cross tools: {'; '.join(missing)}")
    for item in items:
        if "needs_qemu" in item.keywords:
            item.add_marker(skip)
