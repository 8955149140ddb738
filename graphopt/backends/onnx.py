"""target="onnx": the optimized graph exported to ONNX and run by onnxruntime (CPU).

The whole graph goes through torch.export and torch.onnx's translator (int8 graphs become
QuantizeLinear/DequantizeLinear, which onnxruntime fuses into its integer kernels; weight-only
int8/int4 linear layers become onnxruntime's `com.microsoft.MatMulNBits`, see
`weight_only_to_matmul_nbits`). Dims that
are dynamic in a torch.export graph stay dynamic; under torch.compile, a graph with dynamic
sizes (SymInt inputs) is not taken. A graph the exporter cannot take runs in PyTorch instead,
named in the report (lowering's fallback).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from graphopt.backends.base import Backend, Compiled, ExportJob
from graphopt.backends.registry import OpRegistry
from graphopt.config import Config
from graphopt.passes.base import copy_graph_module

log = logging.getLogger("graphopt")

ONNX = OpRegistry("onnxruntime", supports_all=True)


class OnnxBackend(Backend):
    """The whole graph as one ONNX model in an onnxruntime CPU session; artifacts are
    model.onnx, checked by onnx.checker."""

    label = "onnxruntime"
    registry = ONNX
    model_file = "model.onnx"
    versions = ("onnx", "onnxruntime")

    def compile(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        cfg: Config,
        *,
        training: bool = False,
        backward: bool = False,
    ) -> Compiled:
        return Compiled(compile_onnx(gm, example_inputs, cfg))

    def from_onnx(self, data: bytes, example_inputs: Sequence[Any]) -> Compiled:
        """A session over an ONNX model already exported from the graph (`export_onnx`):
        target="auto" exports once for onnxruntime and OpenVINO."""
        return Compiled(_checked(OnnxRunner(data), example_inputs, "ONNX"))

    def write(self, job: ExportJob, folder: Path) -> dict[str, Any]:
        import onnx

        job.say("exporting to ONNX (torch.onnx)")
        traced = [n.meta["val"] for n in job.gm.graph.find_nodes(op="placeholder")]  # symbolic
        data = export_onnx(job.gm, traced, job.dim_names)
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
        (folder / self.model_file).write_bytes(data)
        return {}

    def where_artifact_runs(self, cfg: Config) -> str:
        return "in onnxruntime (CPU)"

    def load(self, folder: Path, manifest: dict[str, Any]) -> Callable[..., Any]:
        return OnnxRunner(str(folder / manifest["model"]))


def export_onnx(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    dim_names: dict[str, str] | None = None,
) -> bytes:
    """The graph as a serialized ONNX model. A symbolic dim of an input (a SymInt in its traced
    shape, e.g. a dynamic batch) stays symbolic in the ONNX model, named by `dim_names`
    (torch's symbol -> a name) or by its symbol."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        args = tuple(_real_like(x) for x in example_inputs)
        module = copy_graph_module(gm)
        for node in module.graph.nodes:  # traced metadata belongs to another fake mode: re-trace
            node.meta = {}
        dynamic = _dynamic_shapes(example_inputs, dim_names or {})
        weight_only_to_matmul_nbits(module)
        exported = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
        program = torch.onnx.export(
            exported,
            args,
            dynamo=True,
            verbose=False,
            custom_translation_table={torch.ops.graphopt.matmul_nbits.default: _matmul_nbits},
        )
        proto = program.model_proto
        if dim_names:
            _rename_dims(proto, example_inputs, dim_names)
        return proto.SerializeToString()


# ------------------------------------------------------------------ weight-only linear layers

_LIBRARY = torch.library.Library("graphopt", "FRAGMENT")  # noqa: TOR901 - lives with the process
_LIBRARY.define(
    "matmul_nbits(Tensor x, Tensor b, Tensor scales, Tensor zero_points, Tensor? bias, int k, "
    "int n, int bits, int block_size) -> Tensor"
)
INT8_BLOCK = 128  # K per scale block of an int8 layer in MatMulNBits (its scale is per row)


@torch.library.impl(_LIBRARY, "matmul_nbits", "CompositeExplicitAutograd")
def _matmul_nbits_reference(x, b, scales, zero_points, bias, k, n, bits, block_size):
    """onnxruntime's MatMulNBits: y = x @ ((code - zero_point) * scale)[:, :k].T + bias, codes
    packed low nibble first along K in blocks of `block_size`."""
    codes = b if bits == 8 else torch.stack([b & 15, b >> 4], dim=-1).flatten(-2)
    zero = zero_points.float().view(n, -1, 1)
    weight = ((codes.float() - zero) * scales.view(n, -1, 1)).reshape(n, -1)[:, :k]
    y = x @ weight.T
    return y + bias if bias is not None else y


@torch.library.register_fake("graphopt::matmul_nbits")
def _matmul_nbits_fake(x, b, scales, zero_points, bias, k, n, bits, block_size):
    return x.new_empty((*x.shape[:-1], n))


def _matmul_nbits(x, b, scales, zero_points, bias, k: int, n: int, bits: int, block_size: int):
    """The ONNX translation of graphopt::matmul_nbits (torch.onnx custom_translation_table)."""
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    matmul_nbits = Op(Opset("com.microsoft", 1), "MatMulNBits", _matmul_nbits_schema())
    y = matmul_nbits(x, b, scales, zero_points, K=k, N=n, bits=bits, block_size=block_size)
    return y if bias is None else op.Add(y, bias)


@functools.cache
def _matmul_nbits_schema() -> Any:
    """The part of onnxruntime's MatMulNBits schema graphopt writes (onnx itself has no schemas
    of onnxruntime's contrib ops, and onnxscript needs one to emit a node)."""
    from onnx.defs import OpSchema

    def param(name: str, types: str, optional: bool = False) -> OpSchema.FormalParameter:
        option = OpSchema.FormalParameterOption
        return OpSchema.FormalParameter(
            name, types, param_option=option.Optional if optional else option.Single
        )

    return OpSchema(
        "MatMulNBits",
        "com.microsoft",
        1,
        inputs=[
            param("A", "T1"),
            param("B", "T2"),
            param("scales", "T1"),
            param("zero_points", "T3", True),
        ],
        outputs=[param("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)"], ""),
            ("T2", ["tensor(uint8)"], ""),
            ("T3", ["tensor(uint8)", "tensor(float)"], ""),
        ],
        attributes=[
            OpSchema.Attribute(name, OpSchema.AttrType.INT, "")
            for name in ("K", "N", "bits", "block_size")
        ],
    )


def matmul_nbits_tensors(op: Any, args: Sequence[Any]) -> tuple[dict[str, torch.Tensor], int]:
    """(MatMulNBits' b, scales and zero_points, block_size) for a graphopt weight-only call's
    constant tensors (`args` as the op takes them).

    int4: each group of graphopt's layout becomes a block: codes repacked low nibble first,
    its float scale and zero point as they are (the same numbers graphopt computes with).
    int8: symmetric codes shifted to uint8 around a zero point of 128, the row's scale repeated
    for each block of `INT8_BLOCK` channels (K padded with zero codes to whole blocks)."""
    from graphopt import quantized_linear

    if op is torch.ops.graphopt.linear_int4_weight.default:
        _, packed, scale, zero, group_size, _ = args
        codes = quantized_linear.unpack_int4(packed)
        n, k = codes.shape
        blocks = codes.view(n, k // group_size, group_size // 2, 2)
        b = (blocks[..., 0] | (blocks[..., 1] << 4)).contiguous()
        return {"b": b, "scales": scale.float(), "zero_points": zero.float()}, group_size
    _, weight, scale, _ = args
    weight = quantized_linear.untile_int8(weight)
    n, k = weight.shape
    blocks = -(-k // INT8_BLOCK)
    codes = torch.full((n, blocks * INT8_BLOCK), 128, dtype=torch.uint8)
    codes[:, :k] = (weight.to(torch.int16) + 128).to(torch.uint8)
    tensors = {
        "b": codes.view(n, blocks, INT8_BLOCK),
        "scales": scale.float()[:, None].expand(n, blocks).contiguous(),
        "zero_points": torch.full((n, blocks), 128, dtype=torch.uint8),
    }
    return tensors, INT8_BLOCK


def weight_only_to_matmul_nbits(gm: torch.fx.GraphModule) -> int:
    """Rewrite gm's weight-only linear calls (`graphopt::linear_int8_weight`,
    `linear_int4_weight`) whose weights are constants into `graphopt::matmul_nbits`, which the
    ONNX export writes as onnxruntime's MatMulNBits. Returns how many were rewritten."""
    from graphopt import quantized_linear
    from graphopt.passes.base import add_constant, get_attr_value

    ops = {torch.ops.graphopt.linear_int8_weight.default: 8}
    ops[torch.ops.graphopt.linear_int4_weight.default] = 4
    done = 0
    for node in list(gm.graph.nodes):
        bits = ops.get(node.target) if node.op == "call_function" else None
        constants = node.args[1:4] if bits == 4 else node.args[1:3]
        if bits is None or not all(
            isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in constants
        ):
            continue
        values = [
            get_attr_value(gm, a) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a
            for a in node.args
        ]
        tensors, block_size = matmul_nbits_tensors(node.target, values)
        shape = values[1].shape  # int4: [N, K/2] packed; int8: either layout
        n, k = (shape[0], shape[1] * 2) if bits == 4 else quantized_linear.int8_shape(shape)
        with gm.graph.inserting_before(node):
            inputs = [
                gm.graph.get_attr(add_constant(gm, t, f"nbits_{name}"))
                for name, t in tensors.items()
            ]
            bias = node.args[-1]
            new = gm.graph.call_function(
                torch.ops.graphopt.matmul_nbits.default,
                (node.args[0], *inputs, bias, k, n, bits, block_size),
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.eliminate_dead_code()
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name, _ in list(gm.named_buffers()):  # the graphopt layouts' constants
            if name not in used and "." not in name:
                delattr(gm, name)
        gm.graph.lint()
        gm.recompile()
    return done


def _rename_dims(proto: Any, example_inputs: Sequence[Any], dim_names: dict[str, str]) -> None:
    """Name the ONNX model's dynamic dims as the user named them (the exporter uses its own
    symbols): each input dim that is one of `dim_names`' symbols, and that symbol wherever else
    it appears in the graph's inputs, outputs and value infos (10*s77 -> 10*batch)."""
    renames = {}
    for value, x in zip(proto.graph.input, example_inputs):
        for dim, size in zip(value.type.tensor_type.shape.dim, getattr(x, "shape", ())):
            if isinstance(size, torch.SymInt) and dim.dim_param:
                name = dim_names.get(str(size.node.expr))
                if name is not None:
                    renames[dim.dim_param] = name
    if not renames:
        return
    import re

    symbol = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
    graph = proto.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:  # also inside expressions like 10*s77
                dim.dim_param = symbol.sub(lambda m: renames[m.group(1)], dim.dim_param)


def _dynamic_shapes(example_inputs: Sequence[Any], dim_names: dict[str, str]) -> tuple | None:
    """torch.export dynamic_shapes for the graph's inputs: one Dim per symbol, shared by every
    input dim that is that symbol; None when all shapes are static."""
    dims: dict[str, Any] = {}
    spec = []
    for x in example_inputs:
        entry = {}
        for i, d in enumerate(x.shape if isinstance(x, torch.Tensor) else ()):
            if isinstance(d, torch.SymInt):
                expr = d.node.expr
                if not expr.is_Symbol:
                    raise NotImplementedError(
                        f"input dim {i} has size {expr}: ONNX export takes a dynamic dim only "
                        "as a plain symbol (like a batch size)"
                    )
                if expr.name not in dims:
                    dims[expr.name] = _dim(dim_names.get(expr.name, expr.name), d)
                entry[i] = dims[expr.name]
        spec.append(entry or None)
    return tuple(spec) if dims else None


def _dim(name: str, size: torch.SymInt) -> Any:
    """A torch.export Dim for a traced symbolic size, with the range the trace found for it
    (e.g. a sequence length bounded by a model's position embeddings)."""
    bounds = size.node.shape_env.var_to_range.get(size.node.expr)
    kwargs = {}
    if bounds is not None:
        if bounds.lower.is_number and int(bounds.lower) > 0:
            kwargs["min"] = int(bounds.lower)
        if bounds.upper.is_number and bounds.upper.is_finite:
            kwargs["max"] = int(bounds.upper)
    return torch.export.Dim(name, **kwargs)


def compile_onnx(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config
) -> Callable[..., Any]:
    """An onnxruntime session for `gm`; returns a function of gm's inputs giving a tuple."""
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise NotImplementedError(
            "target='onnx' under torch.compile takes static shapes only (dynamo passes dynamic "
            "sizes as inputs of their own); graphopt.export(..., format='onnx', "
            "dynamic_shapes=...) writes an ONNX model with dynamic dims"
        )
    return _checked(OnnxRunner(export_onnx(gm, example_inputs)), example_inputs, "ONNX")


def _checked(run: Any, example_inputs: Sequence[Any], what: str) -> Any:
    """`run`, if its model takes as many inputs as the graph (else a ValueError)."""
    if run.num_inputs != len(example_inputs):
        raise ValueError(
            f"the {what} model takes {run.num_inputs} inputs, the graph {len(example_inputs)}"
        )
    return run


def session_options() -> Any:
    """The onnxruntime options of every CPU session graphopt opens (and the benchmarks' anchor):
    all graph optimizations; the intra-op threads spin between the ops of a Run() and stop
    spinning when it returns (`session.force_spinning_stop`).

    By default they also spin after Run() returns, on the cores PyTorch's ops need next (a
    graph split between onnxruntime and PyTorch pays for it on every call). Not spinning at
    all costs onnxruntime between its own ops instead, so they spin inside Run() only."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    # Sequential execution (the default) leaves the inter-op pool unused.
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OnnxRunner:
    """An onnxruntime CPU session over a model (serialized bytes or a file path); call it with
    torch tensors, in the model's input order, to get a tuple of torch tensors."""

    def __init__(self, model: bytes | str):
        import onnxruntime as ort

        self.session = ort.InferenceSession(
            model, session_options(), providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.num_inputs = len(self.input_names)

    def __call__(self, *args: Any) -> tuple[torch.Tensor, ...]:
        feeds = {n: a.detach().contiguous().numpy() for n, a in zip(self.input_names, args)}
        return tuple(torch.from_numpy(o) for o in self.session.run(None, feeds))


def _real_like(x: Any) -> Any:
    """A real tensor of x's dtype and shape (a symbolic dim at the size it was traced with)."""
    if not isinstance(x, torch.Tensor):
        return x
    from graphopt.shapes import concrete

    shape = tuple(int(concrete(d)) for d in x.shape)
    if x.is_floating_point():
        return torch.randn(shape, dtype=x.dtype)
    return torch.zeros(shape, dtype=x.dtype)
