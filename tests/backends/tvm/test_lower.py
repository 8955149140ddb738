"""TVM lowering end to end: models, symbolic batch, DLPack, errors, CUDA and ARM builds."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import tvm
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt.backends.tvm import (
    TVM,
    LoweringError,
    build_relax,
    compile_relax,
    compile_subgraph,
)
from graphopt.capture import capture_export
from graphopt.config import Config
from graphopt.testing import assert_same_outputs

LLVM = Config(target="llvm")


def _seeded(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    return model.eval()


class SmallCNN(nn.Module):
    """conv + BN + relu, a residual add, max pool, adaptive avg pool and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = self.pool(F.relu(y + self.conv(y)))
        return self.head(self.gap(y).flatten(1))


def _cnn() -> nn.Module:
    model = _seeded(SmallCNN())
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


MODELS = {
    "cnn": (_cnn, (_randn(2, 3, 12, 12),)),
    "depthwise": (
        lambda: _seeded(
            nn.Sequential(
                nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), nn.ReLU6(), nn.Conv2d(6, 4, 1)
            )
        ),
        (_randn(1, 6, 9, 9),),
    ),
    "mlp": (
        lambda: _seeded(
            nn.Sequential(
                nn.Linear(10, 32),
                nn.GELU(),
                nn.Linear(32, 16),
                nn.Tanh(),
                nn.Linear(16, 3),
                nn.LogSoftmax(-1),
            )
        ),
        (_randn(4, 10),),
    ),
    "transformer": (
        lambda: _seeded(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)),
        (_randn(2, 5, 16),),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_eager(name, tvm_matches):
    make, inputs = MODELS[name]
    model = make()
    captured = capture_export(model, inputs)
    with torch.no_grad():
        expected = model(*inputs)
    tvm_matches(captured.gm, captured.example_inputs, expected)


def test_tiny_bert_matches_eager(tvm_matches):
    """A Hugging Face encoder (random weights, no download): embeddings, gather, attention."""
    import transformers  # a test dependency: missing it is a failure, not a skip

    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    captured = capture_export(model, (ids,))
    with torch.no_grad():
        expected = model(ids)
    tvm_matches(captured.gm, captured.example_inputs, tuple(expected.values()))


def test_symbolic_batch_compiles_once_for_every_batch_size():
    model = _seeded(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Softmax(-1)))
    batch = Dim("batch", min=1, max=64)
    captured = capture_export(model, (torch.randn(3, 8),), dynamic_shapes=({0: batch},))
    compiled = compile_subgraph(captured.gm, captured.example_inputs, LLVM)
    for size in (2, 5):
        x = torch.randn(size, 8)
        first = compiled(x)
        kept = [t.clone() for t in first]
        compiled(torch.randn(size, 8))  # a second call must not overwrite the first's outputs
        with torch.no_grad():
            assert_same_outputs((model(x),), first)
        assert_same_outputs(kept, first)


def test_tensors_cross_by_dlpack_without_copies():
    """An output that is the input itself comes back as the very same memory (both ways)."""
    x = torch.randn(4, 6)
    gm = make_fx(lambda x: (x, x.view(24), x * 2))(x)
    passthrough, view, doubled = compile_subgraph(gm, [x], LLVM)(x)
    assert passthrough.data_ptr() == x.data_ptr()
    assert view.data_ptr() == x.data_ptr()
    assert torch.equal(doubled, x * 2)


def test_fresh_outputs_never_alias_inputs():
    """clone() lowers to nothing in Relax; the result must still be a tensor of its own."""
    x = torch.randn(3, 3)
    gm = make_fx(lambda x: (x.clone(), x.to(torch.float32, copy=True), x + 1, (x + 1).clone()))(x)
    outputs = compile_subgraph(gm, [x], LLVM)(x)
    assert_same_outputs((x, x, x + 1, x + 1), outputs)
    pointers = {x.data_ptr()} | {out.data_ptr() for out in outputs}
    assert len(pointers) == 5


def test_non_contiguous_and_misaligned_inputs(tvm_matches):
    example = torch.randn(4, 5)
    gm = make_fx(lambda x: x.sum(0) + 1)(example)
    compiled = tvm_matches(gm, [example], example.sum(0) + 1)
    transposed = torch.randn(5, 4).t()
    offset = torch.randn(21)[1:].view(4, 5)  # data starts 4 bytes past an aligned address
    for x in (transposed, offset):
        assert_same_outputs((x.sum(0) + 1,), compiled(x))


def test_symint_inputs_are_not_tvm_params():
    def fn(x, n):
        return x.view(n, -1) * 2

    x = torch.randn(6, 4)
    gm = make_fx(fn, tracing_mode="symbolic")(x, 6)
    placeholders = gm.graph.find_nodes(op="placeholder")
    assert isinstance(placeholders[1].meta["val"], torch.SymInt)
    mod = build_relax(gm, [x, 6], LLVM)
    assert len(mod["main"].params) == 1
    compiled = compile_subgraph(gm, [x, 6], LLVM)
    y = torch.randn(3, 4)
    assert_same_outputs((fn(y, 3),), compiled(y, 3))


def test_check_rejects_with_a_reason_and_build_raises_lowering_error():
    x = torch.randn(1, 2, 5, 5)
    weight = torch.randn(2, 3, 3, 3)
    gm = make_fx(lambda x: F.conv_transpose2d(x, weight))(x)
    conv = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.convolution.default)
    assert "transposed" in TVM.unsupported_reason(conv, LLVM)
    with pytest.raises(LoweringError, match=conv.name):
        build_relax(gm, [x], LLVM)


@pytest.mark.parametrize(
    "fn, reason",
    [
        (lambda x: F.avg_pool2d(x, 2, divisor_override=3), "divisor_override"),
        (lambda x: F.max_pool2d(x[0], 2), "unbatched"),
        (lambda x: F.interpolate(x, scale_factor=2), "no tvm rule"),
        (lambda x: torch.view_as_complex(x[..., :2].contiguous()), "complex"),
    ],
)
def test_unsupported_ops_have_no_rule_or_a_reason(fn, reason):
    gm = make_fx(fn)(torch.randn(1, 2, 5, 4))
    reasons = [TVM.unsupported_reason(n, LLVM) for n in gm.graph.nodes]
    assert any(r is not None and reason in r for r in reasons), reasons


def test_cuda_build_without_gpu_produces_kernels(cuda_kernels):
    """The CUDA codegen path (dlight schedules included) runs without a GPU; nvcc, when
    present, checks the generated kernels compile."""
    captured = capture_export(_cnn(), (torch.randn(2, 3, 12, 12),))
    cfg = Config(target="cuda")
    cuda_kernels(compile_relax(build_relax(captured.gm, captured.example_inputs, cfg), cfg), cfg)


@pytest.mark.skipif(tvm.cuda(0).exist, reason="a GPU is visible to TVM")
def test_cuda_without_gpu_raises_a_clear_error():
    gm = make_fx(lambda x: x + 1)(torch.randn(2))
    with pytest.raises(RuntimeError, match="target='cuda' needs a CUDA GPU visible to TVM"):
        compile_subgraph(gm, [torch.randn(2)], Config(target="cuda"))


@pytest.mark.needs_gpu
@pytest.mark.skipif(not tvm.cuda(0).exist, reason="no CUDA GPU visible to TVM")
def test_cuda_runs_and_matches_eager():
    """A graph traced on the GPU returns GPU tensors; one traced on the CPU takes and returns
    CPU tensors (the inputs are copied to the GPU and the outputs back)."""
    for device in ("cuda", "cpu"):
        model = _cnn().to(device)
        x = torch.randn(2, 3, 12, 12, device=device)
        captured = capture_export(model, (x,))
        compiled = compile_subgraph(captured.gm, captured.example_inputs, Config(target="cuda"))
        with torch.no_grad():
            expected = model(x)
        got = compiled(x)
        assert got[0].device == x.device
        assert_same_outputs((expected,), got)


def test_aarch64_cross_compiles_and_refuses_to_run_on_x86():
    model = _seeded(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)))
    captured = capture_export(model, (torch.randn(2, 8),))
    cfg = Config(target="aarch64")
    executable = compile_relax(build_relax(captured.gm, captured.example_inputs, cfg), cfg)
    llvm = [m for m in executable.mod.imports if m.kind == "llvm"]
    assert 'target triple = "aarch64' in llvm[0].inspect_source("ll")
    if platform.machine() == "x86_64":
        with pytest.raises(RuntimeError, match="cannot run on this"):
            compile_subgraph(captured.gm, captured.example_inputs, cfg)


_THREADS = (  # TVM's pool as a user meets it: after a model compiled and ran for llvm
    "import torch, tvm, graphopt; "
    "m = torch.nn.Linear(4, 4).eval(); x = torch.randn(2, 4); "
    "graphopt.optimize(m, (x,), target='llvm')(x); "
    "print(torch.get_num_threads(), tvm.get_global_func('runtime.NumThreads')())"
)


@pytest.mark.parametrize(
    "env, expected",
    [({}, "torch"), ({"TVM_NUM_THREADS": "1"}, 1), ({"OMP_NUM_THREADS": "1"}, 1)],
    ids=["torch's count", "TVM_NUM_THREADS", "OMP_NUM_THREADS"],
)
def test_tvm_runs_as_many_threads_as_torch_unless_told(env, expected):
    """TVM alone gives x86 kernels half the CPUs (one on a 2-core machine); graphopt sizes its
    pool like torch's, and leaves a thread count the user set alone."""
    clean = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    result = subprocess.run(
        [sys.executable, "-c", _THREADS],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
    )
    assert result.returncode == 0, result.stderr
    torch_threads, tvm_threads = map(int, result.stdout.split()[-2:])
    assert tvm_threads == (torch_threads if expected == "torch" else expected), result.stdout
