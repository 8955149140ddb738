import pytest
import torch
from torch import nn

import graphopt
from graphopt.config import Config
from graphopt.passes import cast_precision as cp
from graphopt.passes.fold_constants import fold_constants
from graphopt.testing import relative_error
from tests.passes.conftest import batch_dim, capture, ops

aten = torch.ops.aten
BF16 = Config(dtype="bfloat16")


@pytest.fixture
def native(monkeypatch):
    """Run the pass whatever this CPU has (emulated bfloat16 computes the same numbers)."""
    monkeypatch.setattr(cp, "native", lambda dtype: True)


class Block(nn.Module):
    """A transformer-like block: matmuls, a softmax, a LayerNorm, a residual, an in-place-free
    elementwise tail, and a KV-cache-like write into a float32 buffer."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / 32**0.5, dim=-1) @ v
        h = x + self.out(attn)
        return self.norm(torch.nn.functional.gelu(h))


def _input_dtypes(gm, target):
    return [
        [
            a.meta["val"].dtype
            for a in n.all_input_nodes
            if isinstance(a.meta.get("val"), torch.Tensor)
        ]
        for n in gm.graph.nodes
        if n.target == target
    ]


def test_matmuls_run_in_bfloat16_and_softmax_norm_outputs_stay_float32(native):
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 8, 32)
    gm, inputs = capture(model, x)
    gm = fold_constants(gm, Config()).gm

    result = cp.cast_precision(gm, BF16)
    gm.recompile()

    assert result.modified
    for target in (aten.addmm.default, aten.bmm.default):
        dtypes = _input_dtypes(gm, target)
        assert dtypes and all(d == torch.bfloat16 for ds in dtypes for d in ds), (target, dtypes)
    # The softmax and the LayerNorm compute on what they were traced with.
    for target in (aten._softmax.default, aten.native_layer_norm.default):
        assert all(d == torch.float32 for ds in _input_dtypes(gm, target) for d in ds)
    summary = gm.meta["graphopt.precision"]
    assert summary.applied and summary.kept_float32.get("_softmax") == 1
    assert summary.weight_bytes_after * 2 == summary.weight_bytes_before
    with torch.no_grad():
        expected, got = model(x), gm(*inputs)
    got = got[0] if isinstance(got, tuple | list) else got
    assert got.dtype == torch.float32  # callers see eager's dtypes
    assert 0 < relative_error(expected, got) < 2e-2


def test_symbolic_batch_survives_the_casts(native):
    model = Block().eval()
    gm, inputs = capture(model, torch.randn(2, 8, 32), dynamic_shapes=batch_dim())
    gm = fold_constants(gm, Config()).gm
    cp.cast_precision(gm, BF16)
    gm.recompile()
    x = torch.randn(5, 8, 32)
    with torch.no_grad():
        got = gm(x)
    got = got[0] if isinstance(got, tuple | list) else got
    assert got.shape == (5, 8, 32) and relative_error(model(x), got) < 2e-2


class CacheWrite(nn.Module):
    """A write into a float32 buffer of a matmul's result (a static KV cache's update)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16, bias=False)

    def forward(self, x, cache, pos):
        cache.index_copy_(0, pos, self.proj(x))
        return cache.sum(0)


def test_in_place_writes_get_the_dtype_they_were_traced_with(native):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    model = CacheWrite().eval()
    x, pos = torch.randn(2, 16), torch.tensor([1, 3])
    gm = make_fx(model)(x, torch.zeros(4, 16), pos)  # index_copy_ stays in place, as in aot's
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(
        x, torch.zeros(4, 16), pos
    )

    cp.cast_precision(gm, BF16)
    gm.recompile()

    assert _input_dtypes(gm, aten.mm.default) == [[torch.bfloat16, torch.bfloat16]]
    written = _input_dtypes(gm, aten.index_copy_.default)
    assert written == [[torch.float32, torch.int64, torch.float32]]
    cache = torch.zeros(4, 16)
    gm(x, cache, pos)
    assert 0 < relative_error(model.proj(x).detach(), cache[pos]) < 1e-2


def test_nothing_changes_where_the_cpu_has_no_native_dtype(monkeypatch, caplog):
    monkeypatch.setattr(cp, "native", lambda dtype: False)
    gm, _ = capture(Block(), torch.randn(2, 8, 32))
    before = ops(gm)

    result = cp.cast_precision(gm, Config(dtype="float16"))

    assert not result.modified and ops(gm) == before
    summary = gm.meta["graphopt.precision"]
    assert not summary.applied and "no native float16" in str(summary)
    assert "no native float16" in caplog.text


def test_float32_is_a_no_op():
    gm, _ = capture(Block(), torch.randn(2, 8, 32))
    assert not cp.cast_precision(gm, Config()).modified
    assert "graphopt.precision" not in gm.meta


def test_a_torch_dtype_is_taken_by_its_name():
    assert Config(dtype=torch.bfloat16) == Config(dtype="bfloat16")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dtype": "half"}, "accepted values: ['float32', 'bfloat16', 'float16']"),
        ({"dtype": "bfloat16", "target": "llvm"}, "target='cpu'"),
        ({"dtype": "bfloat16", "quantize": "int8_weight_only"}, "do not combine yet"),
    ],
)
def test_bad_dtype_options_say_what_is_accepted(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Config(**options)


def test_torch_compile_reports_what_ran_in_bfloat16(native):
    graphopt.clear_reports()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    x = torch.randn(4, 3, 16, 16)
    compiled = torch.compile(model, backend="graphopt", options={"dtype": "bfloat16"})
    with torch.no_grad():
        expected, got = model(x), compiled(x)
    assert got.dtype == torch.float32 and relative_error(expected, got) < 2e-2
    report = graphopt.reports()[-1]
    assert report.precision.applied
    assert report.precision.low_ops == {"convolution": 1, "addmm": 1}
    assert "bfloat16: 2 matmuls/convolutions in bfloat16" in str(report)
