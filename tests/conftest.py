import pytest
import torch

import graphopt


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    """dynamo reuses compiled graphs across instances of one class: reset between tests."""
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
