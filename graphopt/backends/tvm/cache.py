"""An on-disk cache of compiled TVM libraries, so a second process does not recompile a graph.

    graph_key(gm, cfg, target) -> sha256 hex of everything the compiled library depends on
    load(root, key)            -> relax.VMExecutable, or None (missing, or corrupt: evicted)
    store(root, key, exe)      -> writes the entry atomically (temp folder + rename)

The key hashes the whole graph, not just its op sequence (Torch-TensorRT's cache hashed only
each node's op target and reused engines built for other arguments and edges): every node in
order with its op, its target's qualified name, its args/kwargs (an fx Node by its position, so
`x - y` and `y - x` differ; SymInts by their sympy expression) and its traced value's spec
(dtype, shape, strides, device); the bytes, dtype and shape of every constant tensor; the
Config fields; the TVM target JSON (with mcpu); and the versions of graphopt, torch, TVM and
the lowering sources (translate.py, build.py, rules/, schedules.py, tune.py, registry.py),
so a rule or schedule fix invalidates old entries; and the sha256 of the tuning database applied
(`tune.py`), so re-tuning rebuilds.

An entry is a folder `<root>/<key>/` holding `<sha256[:16]>.so` (the library, named by its
hash so dlopen never returns a stale library loaded from the same path) and `meta.json` (key,
library name and sha256, versions, creation time). On load the key and the library hash are
checked; an entry that fails a check or does not load is logged, deleted and rebuilt.

Root: `$GRAPHOPT_CACHE_DIR`, else `~/.cache/graphopt/tvm`; `GRAPHOPT_CACHE=0` turns it off.
There is no size limit: entries are a few hundred KB per graph; delete the folder to clear it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.fx
import tvm
from tvm import relax

from graphopt.backends import graph_key as keys
from graphopt.backends.graph_key import (  # noqa: F401 - UncacheableGraph, switched_off: cache.*
    UncacheableGraph,
    graph_digest,
    switched_off,
)
from graphopt.config import Config
from graphopt.files import file_sha256

log = logging.getLogger(__name__)

KEY_FORMAT = 2  # bump when what graph_key hashes changes
# the code that decides what is built
_SOURCES = ("translate.py", "build.py", "rules/*.py", "schedules.py", "tune.py", "../registry.py")
_NOT_HASHED = ("calibration", "verify")  # their effect is in the graph, or they build nothing
_STALE_TEMP_SECONDS = 24 * 3600  # temp folders left by a crashed writer are removed after this


def cache_root() -> Path | None:
    """The TVM cache folder, or None when `GRAPHOPT_CACHE` is 0/false/off."""
    return keys.cache_root("tvm")


@functools.cache
def versions() -> dict[str, str]:
    """Library versions and a hash of the lowering sources: any change makes new keys."""
    from graphopt.version import __version__

    here = Path(__file__).resolve().parent
    sources = hashlib.sha256()
    for pattern in _SOURCES:
        for path in sorted(here.glob(pattern)):
            sources.update(path.read_bytes())
    return {
        "key_format": str(KEY_FORMAT),
        "graphopt": __version__,
        "torch": torch.__version__,
        "tvm": tvm.__version__,
        "lowering_sources": sources.hexdigest(),
    }


def graph_key(
    gm: torch.fx.GraphModule,
    cfg: Config,
    target: tvm.target.Target,
    tuning: str | None = None,
) -> str:
    """The sha256 (hex) of everything the library compiled from `gm` for `target` depends on.

    Args:
        gm: the graph as compile_subgraph gets it (placeholders' and nodes' meta["val"] give
            the input specs; get_attr constants are real tensors).
        cfg: the graphopt Config (all fields but calibration and verify are hashed).
        target: the resolved TVM target (its JSON, mcpu included, is hashed).
        tuning: the sha256 of the tuning database the library is compiled with (None: none).
    Raises:
        UncacheableGraph: an argument, value or constant that cannot be hashed faithfully
            (a closure as an op, a fake constant, an unknown argument type).
    """
    options = {k: v for k, v in cfg.describe().items() if k not in _NOT_HASHED}
    header = {"versions": versions(), "config": options, "target": str(target), "tuning": tuning}
    return graph_digest(gm, header)


def load(root: Path, key: str) -> relax.VMExecutable | None:
    """The cached executable for `key`, or None: missing, or failing a check (then evicted)."""
    entry = root / key
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise ValueError(f"meta.json names key {str(meta.get('key'))[:16]}...")
        library = entry / Path(str(meta["library"])).name
        if file_sha256(library) != meta["library_sha256"]:
            raise ValueError(f"{library.name} does not match the sha256 in meta.json")
        return relax.VMExecutable(tvm.runtime.load_module(str(library)))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        evict(root, key, f"{type(err).__name__}: {err}")
        return None


def evict(root: Path, key: str, reason: str) -> None:
    """Delete a bad entry (logged as a warning) so that it is rebuilt."""
    log.warning("graphopt: TVM cache entry %s is unusable (%s); rebuilding it", key[:16], reason)
    shutil.rmtree(root / key, ignore_errors=True)


def store(root: Path, key: str, executable: relax.VMExecutable) -> None:
    """Write the entry for `key` atomically; a failure to write is a warning, not an error."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(root)
        temp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
    except OSError as err:
        log.warning("graphopt: cannot write the TVM cache in %s: %s", root, err)
        return
    try:
        executable.export_library(str(temp / "library.so"))
        digest = file_sha256(temp / "library.so")
        library = f"{digest[:16]}.so"
        (temp / "library.so").rename(temp / library)
        meta = {
            "key": key,
            "library": library,
            "library_sha256": digest,
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (temp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        try:
            temp.rename(root / key)  # atomic: readers see no entry or a whole one
        except OSError:
            if not (root / key).is_dir():  # else another process stored the same key first
                raise
    except (OSError, RuntimeError) as err:  # RuntimeError: TVM's export (no C compiler, ...)
        log.warning("graphopt: could not cache the TVM library %s: %s", key[:16], err)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _remove_stale_temps(root: Path) -> None:
    cutoff = time.time() - _STALE_TEMP_SECONDS
    for temp in root.glob(".tmp-*"):
        try:
            if temp.stat().st_mtime < cutoff:
                shutil.rmtree(temp, ignore_errors=True)
        except OSError:
            pass  # removed by another process meanwhile
