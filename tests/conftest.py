import pytest
import torch

import graphopt


@pytest.fixture(autouse=True)
def _fresh_compile_state(monkeypatch):
    """dynamo reuses compiled graphs across instances of one class: reset between tests.

    The TVM disk cache is off (tests compile for real and leave ~/.cache alone);
    tests/backends/tvm/test_cache.py turns it on in a tmp folder.
    """
    monkeypatch.setenv("GRAPHOPT_CACHE", "0")
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
