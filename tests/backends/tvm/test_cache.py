"""The TVM disk cache: hits across calls and processes, misses on any change, rebuilds bad entries.

Run as a script (`python test_cache.py`), this file compiles `_scaled_sum` once and prints
whether it was a cache hit: the second-process test uses that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import tvm
from torch.fx.experimental.proxy_tensor import make_fx
from tvm import relax

from graphopt.backends.tvm import CompiledSubgraph, cache, compile_subgraph, lower
from graphopt.config import Config
from graphopt.testing import assert_same_outputs

LLVM = Config(target="llvm")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


X, Y, W = _randn(4, 4, seed=1), _randn(4, 4, seed=2), _randn(4, 4, seed=3)
W_CHANGED = W.clone()
W_CHANGED[0, 0] += 1.0  # same shape and dtype, one value differs


def _scaled_sum(x: torch.Tensor) -> torch.Tensor:
    return (x * W).sum(0)


def _compile(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> CompiledSubgraph:
    """Trace `fn` afresh, compile it for llvm and check it against eager."""
    compiled = compile_subgraph(make_fx(fn)(*inputs), list(inputs), LLVM)
    assert_same_outputs((fn(*inputs),), compiled(*inputs))
    return compiled


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "tvm-cache"
    monkeypatch.setenv("GRAPHOPT_CACHE", "1")  # tests/conftest.py turns it off for other tests
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(root))
    return root


def test_second_compile_is_a_hit_and_matches_eager(cache_dir):
    first, second = _compile(_scaled_sum, X), _compile(_scaled_sum, X)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert second.mod is None and isinstance(second.executable, relax.VMExecutable)
    [entry] = _entries(cache_dir)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["key"] == entry.name and (entry / meta["library"]).is_file()
    assert set(meta["versions"]) >= {"graphopt", "torch", "tvm", "lowering_sources"}


def test_a_hit_keeps_the_output_aliasing_rules(cache_dir):
    """Passthroughs and views share the input's memory; clone() and x + 1 get their own."""
    x = _randn(4, 4, seed=4)
    fn = lambda x: (x, x.view(16), x.clone(), x + 1)  # noqa: E731
    for expect_hit in (False, True):
        compiled = compile_subgraph(make_fx(fn)(x), [x], LLVM)
        assert compiled.cache_hit is expect_hit
        outputs = compiled(x)
        assert_same_outputs(fn(x), outputs)
        assert outputs[0].data_ptr() == outputs[1].data_ptr() == x.data_ptr()
        assert len({x.data_ptr()} | {out.data_ptr() for out in outputs[2:]}) == 3


# Each pair has the same op sequence (all Torch-TensorRT's key hashed): only the weight
# bytes, an argument, an edge or an input shape tells them apart.
VARIANTS = {
    "weight value": (_scaled_sum, (X,), lambda x: (x * W_CHANGED).sum(0), (X,)),
    "sum dim": (lambda x: x.sum(0), (X,), lambda x: x.sum(1), (X,)),
    "swapped edge": (lambda x, y: x - y, (X, Y), lambda x, y: y - x, (X, Y)),
    "input shape": (lambda x: x.sum(0) * 2, (X,), lambda x: x.sum(0) * 2, (_randn(3, 4, seed=5),)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_different_graph_misses(cache_dir, name):
    fn_a, inputs_a, fn_b, inputs_b = VARIANTS[name]
    ops = [[n.target for n in make_fx(f)(*i).graph.nodes if n.op == "call_function"]
           for f, i in ((fn_a, inputs_a), (fn_b, inputs_b))]  # fmt: skip
    assert ops[0] == ops[1]
    assert not _compile(fn_a, *inputs_a).cache_hit
    assert not _compile(fn_b, *inputs_b).cache_hit  # and matches fn_b's eager result
    assert _compile(fn_a, *inputs_a).cache_hit
    assert len(_entries(cache_dir)) == 2


def test_other_target_options_or_config_miss(cache_dir, monkeypatch):
    fn = lambda x: x.sum(0) * 2  # noqa: E731
    assert not _compile(fn, X).cache_hit
    generic = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
    monkeypatch.setattr(lower, "target_for", lambda cfg: generic)
    assert not _compile(fn, X).cache_hit
    assert _compile(fn, X).cache_hit
    gm = make_fx(fn)(X)
    key = cache.graph_key(gm, LLVM, generic)
    assert key != cache.graph_key(gm, Config(target="llvm", fallback="error"), generic)
    assert key == cache.graph_key(gm, Config(target="llvm", verify=True), generic)


def _flip_library_bytes(entry: Path, meta: dict) -> None:
    library = entry / meta["library"]
    data = bytearray(library.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    library.write_bytes(bytes(data))


def _not_a_library_with_matching_hash(entry: Path, meta: dict) -> None:
    import hashlib

    (entry / meta["library"]).write_bytes(b"not an ELF file")
    meta["library_sha256"] = hashlib.sha256(b"not an ELF file").hexdigest()
    (entry / "meta.json").write_text(json.dumps(meta))


CORRUPTIONS = {
    "library bytes": _flip_library_bytes,
    "library truncated": lambda e, m: (e / m["library"]).write_bytes(b"\x7fELF"),
    "library missing": lambda e, m: (e / m["library"]).unlink(),
    "library fails to load": _not_a_library_with_matching_hash,
    "meta truncated": lambda e, m: (e / "meta.json").write_text(json.dumps(m)[:40]),
    "meta names another key": lambda e, m: (e / "meta.json").write_text(
        json.dumps({**m, "key": "0" * 64})
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_entry_is_detected_and_rebuilt(cache_dir, caplog, name):
    _compile(_scaled_sum, X)
    [entry] = _entries(cache_dir)
    CORRUPTIONS[name](entry, json.loads((entry / "meta.json").read_text()))
    rebuilt = _compile(_scaled_sum, X)  # checked against eager inside
    assert not rebuilt.cache_hit
    assert "unusable" in caplog.text and entry.name[:16] in caplog.text
    assert _compile(_scaled_sum, X).cache_hit


def test_a_failed_write_leaves_no_entry(cache_dir, caplog, monkeypatch):
    """A writer that dies mid-export leaves only its temp folder, never a half entry."""

    def crash(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x7fELF half")
        raise RuntimeError("linker killed")

    monkeypatch.setattr(relax.VMExecutable, "export_library", crash)
    assert not _compile(_scaled_sum, X).cache_hit
    assert "linker killed" in caplog.text
    assert not cache_dir.exists() or _entries(cache_dir) == []
    monkeypatch.undo()
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(cache_dir))
    assert not _compile(_scaled_sum, X).cache_hit
    assert _compile(_scaled_sum, X).cache_hit


def test_a_second_process_hits_the_cache(cache_dir):
    cold = _compile(_scaled_sum, X)
    assert not cold.cache_hit
    result = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    warm = json.loads(result.stdout.strip().splitlines()[-1])
    assert warm["cache_hit"], (warm, cold.compile_seconds)


def test_graphopt_cache_0_disables_it(cache_dir, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE", "0")
    assert [_compile(_scaled_sum, X).cache_hit for _ in range(2)] == [False, False]
    assert not cache_dir.exists()


if __name__ == "__main__":  # the second process of test_a_second_process_hits_the_cache
    compiled = _compile(_scaled_sum, X)
    print(json.dumps({"cache_hit": compiled.cache_hit, "seconds": compiled.compile_seconds}))
