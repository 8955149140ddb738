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
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx
import tvm
from torch._subclasses.fake_tensor import is_fake
from tvm import relax

from graphopt.config import Config
from graphopt.files import file_sha256
from graphopt.passes.base import get_attr_value

log = logging.getLogger(__name__)

KEY_FORMAT = 2  # bump when what graph_key hashes changes
# the code that decides what is built
_SOURCES = ("translate.py", "build.py", "rules/*.py", "schedules.py", "tune.py", "../registry.py")
_NOT_HASHED = ("calibration", "verify")  # their effect is in the graph, or they build nothing
_STALE_TEMP_SECONDS = 24 * 3600  # temp folders left by a crashed writer are removed after this


class UncacheableGraph(ValueError):
    """The graph holds something graph_key cannot hash faithfully (it is compiled, not cached)."""


def switched_off(variable: str) -> bool:
    """Whether the environment variable says 0/false/off/no (unset: on)."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "off", "no")


def cache_root() -> Path | None:
    """The cache folder, or None when `GRAPHOPT_CACHE` is 0/false/off."""
    if switched_off("GRAPHOPT_CACHE"):
        return None
    configured = os.environ.get("GRAPHOPT_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "graphopt" / "tvm"


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
    digest = hashlib.sha256()
    _feed(
        digest,
        {"versions": versions(), "config": options, "target": str(target), "tuning": tuning},
    )
    index = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        record: list[Any] = [node.op, _spec(node.meta.get("val"))]
        if node.op == "get_attr":  # the constant's value matters, not its attribute name
            record.append(_tensor_digest(get_attr_value(gm, node), node.name))
        elif node.op != "placeholder":  # a placeholder is its position and spec
            record.append(_qualname(node.target))
            record.append(_arg(node.args, index))
            record.append(_arg(dict(node.kwargs), index))
        _feed(digest, record)
    return digest.hexdigest()


def _feed(digest: Any, record: Any) -> None:
    data = json.dumps(record, sort_keys=True).encode()
    digest.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no ambiguity


def _qualname(target: Any) -> str:
    if isinstance(target, str):  # call_module / call_method / output
        return target
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target)  # "aten.sum.dim_IntList"
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if module is None or name is None or "<" in name:  # a lambda or closure is not identified
        raise UncacheableGraph(f"call target {target!r} has no stable qualified name")
    return f"{module}.{name}"


_TORCH_ENUMS = (torch.dtype, torch.device, torch.layout, torch.memory_format)


def _arg(value: Any, index: dict[torch.fx.Node, int]) -> Any:
    """A JSON-able, type-tagged form of a node argument; fx Nodes become their position."""
    if isinstance(value, torch.fx.Node):
        return ["node", index[value]]
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float | complex):
        return [type(value).__name__, repr(value)]  # 1, 1.0 and True stay distinct
    if isinstance(value, _TORCH_ENUMS):
        return [type(value).__name__, str(value)]
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return ["sym", str(value.node.expr)]
    if isinstance(value, list | tuple):
        return [type(value).__name__, [_arg(v, index) for v in value]]
    if isinstance(value, dict):
        return ["dict", [[str(k), _arg(v, index)] for k, v in sorted(value.items())]]
    if isinstance(value, slice):
        return ["slice", [_arg(v, index) for v in (value.start, value.stop, value.step)]]
    if value is Ellipsis:
        return ["ellipsis"]
    if isinstance(value, torch.Tensor):
        return _tensor_digest(value, "argument")
    raise UncacheableGraph(f"argument of type {type(value).__name__} cannot be hashed")


def _spec(value: Any) -> Any:
    """The traced value's spec: dtype, shape (symbolic dims as expressions), strides, device."""
    if value is None or isinstance(value, bool | int | float):
        return [type(value).__name__, repr(value)]
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return ["sym", str(value.node.expr)]
    if isinstance(value, list | tuple):
        return [_spec(v) for v in value]
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise UncacheableGraph(f"a {value.layout} tensor value cannot be hashed")
        return [
            "tensor",
            str(value.dtype),
            [_dim(d) for d in value.shape],
            [_dim(s) for s in value.stride()],
            str(value.device),
        ]
    raise UncacheableGraph(f"traced value of type {type(value).__name__} cannot be hashed")


def _dim(d: Any) -> str:
    return str(d.node.expr) if isinstance(d, torch.SymInt) else str(int(d))


def _tensor_digest(value: Any, where: str) -> list[Any]:
    """dtype, shape and the sha256 of the data of a real (not fake) tensor."""
    if not isinstance(value, torch.Tensor) or is_fake(value) or value.device.type == "meta":
        raise UncacheableGraph(f"{where}: constant is not a real tensor ({type(value).__name__})")
    if value.layout != torch.strided or value.is_quantized:
        raise UncacheableGraph(f"{where}: {value.layout} / quantized tensors are not hashed")
    flat = value.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return ["const", str(value.dtype), list(value.shape), hashlib.sha256(data).hexdigest()]


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
