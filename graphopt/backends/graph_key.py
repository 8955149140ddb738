"""Keys of graphs for the disk caches (TVM's compiled libraries, `target="auto"`'s choices):
the sha256 of everything compiled code depends on in a graph, and where the caches live.

`graph_digest` hashes each node's op, arguments (fx nodes by position), traced spec (dtype,
shape with symbolic dims as expressions, strides, device) and, for a constant, its data; with
a header the caller gives (versions, options, target). A graph holding something it cannot
hash faithfully (a closure as an op, a fake constant) raises `UncacheableGraph`: it is then
compiled, not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import is_fake

from graphopt.passes.base import get_attr_value


class UncacheableGraph(ValueError):
    """The graph holds something graph_digest cannot hash faithfully (compiled, not cached)."""


def switched_off(variable: str) -> bool:
    """Whether the environment variable says 0/false/off/no (unset: on)."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "off", "no")


def cache_root(kind: str) -> Path | None:
    """The folder of cache `kind` ("tvm", "auto"), or None when `GRAPHOPT_CACHE` is
    0/false/off. `GRAPHOPT_CACHE_DIR` moves the TVM cache (its historical meaning) and the
    others beside it, as siblings named by their kind."""
    if switched_off("GRAPHOPT_CACHE"):
        return None
    configured = os.environ.get("GRAPHOPT_CACHE_DIR")
    if configured:
        return Path(configured) if kind == "tvm" else Path(configured).parent / f"graphopt-{kind}"
    return Path.home() / ".cache" / "graphopt" / kind


def graph_digest(gm: torch.fx.GraphModule, header: Any) -> str:
    """The sha256 (hex) of `header` (JSON-able) and of every node of `gm`.

    Raises:
        UncacheableGraph: an argument, value or constant that cannot be hashed faithfully.
    """
    digest = hashlib.sha256()
    _feed(digest, header)
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
