"""An artifact folder's manifest.json: what is in it, written by `graphopt.export`, read and
checked by `graphopt.load`, and `Artifact`, the loaded folder called like the model.

manifest.json holds: the files with sha256 and size, graphopt/torch/runtime versions, the
options, input and output specs (name, dtype, shape; a dynamic dim by its Dim name), the
pytree specs to call it like the model, the target's own sections (e.g. "tvm": the TVM target
and the CPU features the library needs; "hls": part, clock, estimates, C simulation), and how
it was verified when it was written.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from graphopt.capture import CapturedGraph
from graphopt.config import Config
from graphopt.files import file_sha256

MANIFEST = "manifest.json"
ARTIFACT_VERSION = 1  # bump when the folder layout or the manifest's meaning changes


def build_manifest(
    gm: torch.fx.GraphModule,
    captured: CapturedGraph,
    cfg: Config,
    backend: Any,
    folder: Path,
    sections: dict[str, Any],
    dim_names: dict[str, str],
) -> dict[str, Any]:
    """The manifest of the files in `folder` (written by `backend`), with the backend's own
    `sections`."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    outputs = gm.graph.find_nodes(op="output")[0].args[0]
    outputs = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
    return {
        "graphopt_artifact": ARTIFACT_VERSION,
        "format": backend.target.format,
        "target": cfg.target,
        "model": backend.model_file,
        "files": {
            p.relative_to(folder).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        },
        "versions": _versions(backend.versions),
        "options": cfg.describe(),
        "inputs": [_spec(n.name, n.meta["val"], dim_names) for n in placeholders],
        "outputs": [_spec(f"output{i}", n.meta["val"], dim_names) for i, n in enumerate(outputs)],
        "in_spec": _dumps(captured.in_spec, "inputs"),
        "out_spec": _dumps(captured.out_spec, "outputs"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **sections,
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    """`folder`'s manifest, after checking every file it lists against its sha256.

    Raises:
        ValueError: not an artifact folder, a file missing or changed, or a newer layout.
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{folder} is not a graphopt artifact (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path} is not valid JSON: {err}") from err
    version = manifest.get("graphopt_artifact") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or version > ARTIFACT_VERSION:
        raise ValueError(
            f"{manifest_path}: artifact layout {version!r} is not one this graphopt reads "
            f"(it reads 1..{ARTIFACT_VERSION})"
        )
    for name, entry in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{folder}: {name} is missing (listed in {MANIFEST})")
        if file_sha256(file) != entry["sha256"]:
            raise ValueError(f"{folder}: {name} does not match its sha256 in {MANIFEST}")
    return manifest


def _versions(modules: Sequence[str]) -> dict[str, str]:
    from graphopt.version import __version__

    versions = {
        "graphopt": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for name in modules:
        module = sys.modules.get(name) or __import__(name)
        versions[name] = str(getattr(module, "__version__", "unknown"))
    return versions


def _dumps(spec: pytree.TreeSpec, what: str) -> str:
    """A pytree spec as JSON (no pickles), or a clear error for a container torch cannot name."""
    try:
        return pytree.treespec_dumps(spec)
    except Exception as err:  # noqa: BLE001 - torch raises several kinds here
        raise ValueError(
            f"the model's {what} use a container type that cannot be written as JSON ({err}); "
            "return tensors, tuples, lists or dicts, or register the type with "
            "torch.utils._pytree.register_pytree_node(..., serialized_type_name=...)"
        ) from err


def user_dim_names(
    model: torch.nn.Module, captured: CapturedGraph, dynamic_shapes: Any
) -> dict[str, str]:
    """torch's symbol (s77) -> the user's Dim name (batch) for dims of top-level tensor inputs
    given a named `torch.export.Dim`; other symbols keep their own name."""
    import inspect

    if dynamic_shapes is None:
        return {}
    if isinstance(dynamic_shapes, dict):  # keyed by forward's parameter names
        params = list(inspect.signature(model.forward).parameters)
        per_input = [dynamic_shapes.get(p) for p in params[: len(captured.example_inputs)]]
    else:
        per_input = list(dynamic_shapes)
    placeholders = captured.gm.graph.find_nodes(op="placeholder")
    names: dict[str, str] = {}
    for node, spec in zip(placeholders, per_input):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or spec is None:
            continue
        dims = spec.items() if isinstance(spec, dict) else enumerate(spec)
        for i, dim in dims:
            size = value.shape[i] if 0 <= i < value.dim() else None
            name = getattr(dim, "__name__", None)
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol and name:
                names.setdefault(size.node.expr.name, name)
    return names


def _dim_text(expr: Any, dim_names: dict[str, str]) -> str:
    """A symbolic size as text, with the user's Dim names (s77 * 2 -> batch*2)."""
    import sympy

    renamed = {s: sympy.Symbol(dim_names[s.name]) for s in expr.free_symbols if s.name in dim_names}
    return str(expr.subs(renamed))  # (torch's symbols carry assumptions: match them by name)


def _spec(name: str, value: Any, dim_names: dict[str, str]) -> dict[str, Any]:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: artifacts take and return tensors, not {type(value).__name__}")
    shape = [
        int(d) if not isinstance(d, torch.SymInt) else _dim_text(d.node.expr, dim_names)
        for d in value.shape
    ]
    return {"name": name, "dtype": str(value.dtype).removeprefix("torch."), "shape": shape}


class Artifact:
    """An exported artifact loaded for running: call it like the original model.

    Attributes:
        path: the folder.
        manifest: its manifest.json.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], run: Callable[..., Any]):
        self.path, self.manifest, self._run = path, manifest, run
        self._in_spec = pytree.treespec_loads(manifest["in_spec"])
        self._out_spec = pytree.treespec_loads(manifest["out_spec"])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self._in_spec:
            raise TypeError(f"{self.path} was exported for inputs {self._in_spec}, got {spec}")
        return pytree.tree_unflatten(list(self.run_flat(flat)), self._out_spec)

    def run_flat(self, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        """Run on the flat list of input tensors (manifest["inputs"] order); a tuple out."""
        specs = self.manifest["inputs"]
        if len(inputs) != len(specs):
            raise TypeError(f"{self.path} takes {len(specs)} inputs, got {len(inputs)}")
        sizes: dict[str, int] = {}
        for value, spec in zip(inputs, specs):
            _check_input(value, spec, sizes)
        return tuple(self._run(*inputs))

    def __repr__(self) -> str:
        m = self.manifest
        return f"Artifact({str(self.path)!r}, format={m['format']!r}, target={m['target']!r})"


def _check_input(value: Any, spec: dict[str, Any], sizes: dict[str, int]) -> None:
    name = spec["name"]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"input {name!r} must be a torch.Tensor, got {type(value).__name__}")
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype != spec["dtype"] or value.dim() != len(spec["shape"]):
        raise ValueError(
            f"input {name!r} is {dtype}{list(value.shape)}, the artifact takes "
            f"{spec['dtype']}{spec['shape']}"
        )
    for got, want in zip(value.shape, spec["shape"]):
        if isinstance(want, int) and got != want or sizes.setdefault(str(want), got) != got:
            raise ValueError(
                f"input {name!r} has shape {list(value.shape)}, the artifact takes "
                f"{spec['shape']} (named dims must agree across inputs: {sizes})"
            )
