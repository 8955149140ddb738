"""The integer program of a quantized graph: what the FPGA computes, layer by layer.

`build_program` reads graphopt's QDQ ATen graph (the quantize pass with target="hls" leaves
every conv, linear, add, concat and average pool between a dequantize and a quantize) and
turns it into a list of integer layers over per-sample buffers. Both the C++ project
(`emit.py`) and the Python reference (`reference.py`) execute this list; the numbers follow
`graphopt.int8`.

    x (float) -> Quantize -> Conv2d (int8 weights, int32 bias, requantize, ReLU as a clamp)
              -> MaxPool2d (on the 8-bit values) -> ... -> Dense -> float logits

Buffers hold one sample, row-major (C, H, W for images), so flatten/view is free: a view names
the same buffer with another shape. The batch dimension is dim 0 of every tensor and the
testbench loops over it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from graphopt import int8
from graphopt.errors import UnsupportedOpError
from graphopt.ops import CLAMPS, op_name
from graphopt.passes.base import get_attr_value

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

_QUANTIZE = (qd.quantize_per_tensor.default,)
_DEQUANTIZE = (qd.dequantize_per_tensor.default,)
_VIEWS = (
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.squeeze.dims,
    aten.squeeze.dim,
    aten.unsqueeze.default,
    aten.clone.default,
)
_LAYERS = (aten.convolution.default, aten.addmm.default, aten.mm.default)
_POOLS = (aten.max_pool2d.default, aten.max_pool2d_with_indices.default)
_AVERAGES = (aten.avg_pool2d.default, aten.mean.dim, aten._adaptive_avg_pool2d.default)
# every ATen op the program builder handles (the capability list of target="hls")
SUPPORTED = (
    *_QUANTIZE,
    *_DEQUANTIZE,
    qd.dequantize_per_channel.default,
    aten.permute.default,
    *_VIEWS,
    *CLAMPS,
    *_LAYERS,
    *_POOLS,
    *_AVERAGES,
    aten.add.Tensor,
    aten.cat.default,
    operator.getitem,
    aten.sym_size.int,
)


@dataclass
class Buffer:
    """A per-sample array: 8-bit activations with their quantization, or float."""

    name: str
    shape: tuple[int, ...]  # without the batch dim
    scale: float | None = None  # None: float32
    zero_point: int = 0

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.scale is None


@dataclass
class Layer:
    """One call into the kernel library. `params` holds its integers (plain data)."""

    name: str
    kind: str  # quantize, dequantize, conv2d, dense, maxpool2d, avgpool2d, add, concat,
    # requantize, clamp
    inputs: list[str]
    output: str
    params: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # weights, biases, m0, shift
    source: str = ""  # the graph nodes it came from


@dataclass
class Program:
    buffers: dict[str, Buffer]
    layers: list[Layer]
    inputs: list[str]  # float input buffers, in placeholder order
    outputs: list[str]  # float output buffers, in output order

    def layer_count(self, kind: str) -> int:
        return sum(1 for layer in self.layers if layer.kind == kind)


def unsupported_reason(node: torch.fx.Node, cfg: Any = None) -> str | None:
    """Why `node` cannot be part of an HLS program, or None (the registry check)."""
    if node.target not in SUPPORTED:
        return f"no hls rule for {op_name(node.target)}"
    return None


class _Builder:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.buffers: dict[str, Buffer] = {}
        self.layers: list[Layer] = []
        self.value: dict[torch.fx.Node, Buffer] = {}  # node -> the buffer holding it
        self.pending: dict[torch.fx.Node, Layer] = {}  # accumulators waiting for their output
        self.problems: list[tuple[str, str, str]] = []
        self.failed: set[torch.fx.Node] = set()  # (their users are not reported again)
        self.handlers = {
            **dict.fromkeys(_QUANTIZE, self.quantize),
            **dict.fromkeys(_DEQUANTIZE, self.dequantize),
            **dict.fromkeys(_VIEWS, self.view),
            **dict.fromkeys(CLAMPS, self.activation),
            **dict.fromkeys(_LAYERS, self.linear_or_conv),
            **dict.fromkeys(_POOLS, self.maxpool),
            **dict.fromkeys(_AVERAGES, self.average),
            aten.add.Tensor: self.add,
            aten.cat.default: self.concat,
            operator.getitem: self.getitem,
            aten.sym_size.int: self.batch_size,
        }
        self.batch: str | None = None

    # -- helpers ---------------------------------------------------------------------------
    def fail(self, node: torch.fx.Node, why: str) -> None:
        self.problems.append((node.name, op_name(node.target), why))
        self.failed.add(node)

    def shape(self, node: torch.fx.Node) -> tuple[int, ...]:
        """The per-sample shape (dim 0, the batch, may be symbolic: a dynamic batch)."""
        shape = tuple(node.meta["val"].shape)
        if self.batch is None and shape:
            self.batch = str(shape[0])
        return tuple(int(d) for d in shape[1:])

    def new_buffer(self, node: torch.fx.Node, scale: float | None, zp: int = 0) -> Buffer:
        buffer = Buffer(f"t_{node.name}", self.shape(node), scale, zp)
        self.buffers[buffer.name] = buffer
        self.value[node] = buffer
        return buffer

    def quantized_input(self, node: Any) -> Buffer | None:
        """The 8-bit buffer behind a dequantize node (or a view of one), else None."""
        buffer = self.value.get(node) if isinstance(node, torch.fx.Node) else None
        return buffer if buffer is not None and not buffer.is_float else None

    def weight(self, node: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int8 weight, float32 scales) of dequantize_per_channel(get_attr...) [.permute]."""
        if isinstance(node, torch.fx.Node) and node.target is aten.permute.default:
            node = node.args[0]
        if not (
            isinstance(node, torch.fx.Node) and node.target is qd.dequantize_per_channel.default
        ):
            return None
        qweight, scales, zero_points, axis = node.args[:4]
        zeros = get_attr_value(self.gm, zero_points)
        if axis != 0 or bool(zeros.any()):
            return None
        return get_attr_value(self.gm, qweight), get_attr_value(self.gm, scales).float()

    # -- the walk --------------------------------------------------------------------------
    def run(self) -> Program:
        inputs, outputs = [], []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                val = node.meta.get("val")
                if not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
                    self.fail(node, "HLS inputs are float32 tensors")
                    continue
                inputs.append(self.new_buffer(node, None).name)
            elif node.op == "get_attr":
                continue
            elif node.op == "output":
                for out in torch.utils._pytree.tree_leaves(node.args[0]):
                    outputs.append(self.output(out))
            elif node.op == "call_function":
                self.call(node)
            else:
                self.fail(node, f"{node.op} nodes are not lowered to HLS")
        if self.problems:
            raise UnsupportedOpError(
                "hls",
                self.problems,
                why="an HLS project computes the whole graph in integers (torch.compile and "
                "graphopt.optimize with target='hls' run such ops in PyTorch instead)",
            )
        return Program(self.buffers, self.layers, inputs, [o for o in outputs if o])

    def call(self, node: torch.fx.Node) -> None:
        target = node.target
        if any(a in self.failed for a in node.all_input_nodes):
            self.failed.add(node)
            return
        if target is qd.dequantize_per_channel.default or (
            target is aten.permute.default
            and getattr(node.args[0], "target", None) is qd.dequantize_per_channel.default
        ):
            return  # read by the layer that uses the weight
        known = [a for a in node.all_input_nodes if a in self.value or a in self.pending]
        if not known:
            return self.fail(node, "computes on constants only (fold it, or it is unsupported)")
        if target not in (*_QUANTIZE, *CLAMPS, *_VIEWS) and any(a in self.pending for a in known):
            return self.fail(
                node,
                "reads a layer's accumulators before they are quantized (quantize the "
                "graph with target='hls')",
            )
        handler = self.handlers.get(target)
        if handler is None:
            return self.fail(node, f"no hls rule for {op_name(target)}")
        handler(node)

    def quantize(self, node: torch.fx.Node) -> None:
        source, scale, zp, qmin, qmax, dtype = node.args
        if (qmin, qmax, dtype) != (int8.ACT_QMIN, int8.ACT_QMAX, int8.ACT_DTYPE):
            return self.fail(node, f"8-bit activations are uint8 [0, 255], got [{qmin}, {qmax}]")
        scale, zp = float(scale), int(zp)
        if source in self.pending:  # accumulators of a layer get their output scale
            layer = self.pending.pop(source)
            out = self.new_buffer(node, scale, zp)
            layer.output = out.name
            return self.requantize_accumulators(layer, out)
        if source in self.value and self.value[source].is_float:
            if self.value[source].name not in self.input_names():
                return self.fail(node, "quantizes a float value that is not a model input")
            out = self.new_buffer(node, scale, zp)
            inv = float(torch.tensor(1.0 / scale, dtype=torch.float32))
            self.add_layer(
                node, "quantize", [self.value[source].name], out.name, {"inv_scale": inv}
            )
            return
        buffer = self.quantized_input(source)
        if buffer is None:
            return self.fail(node, "quantizes a value the HLS program does not compute")
        if (buffer.scale, buffer.zero_point) == (scale, zp):  # same numbers: no work
            self.value[node] = buffer
            return
        out = self.new_buffer(node, scale, zp)
        multipliers, shift = int8.rescale_multipliers([buffer.scale / scale])
        params = {"multipliers": multipliers, "shift": shift, "in_zero_points": [buffer.zero_point]}
        self.add_layer(node, "requantize", [buffer.name], out.name, params)

    def input_names(self) -> set[str]:
        return {b.name for n, b in self.value.items() if n.op == "placeholder"}

    def dequantize(self, node: torch.fx.Node) -> None:
        source, scale, zp = node.args[:3]
        buffer = self.value.get(source)
        if buffer is None or buffer.is_float:
            return self.fail(node, "dequantizes a value the HLS program does not compute")
        if (buffer.scale, buffer.zero_point) != (float(scale), int(zp)):
            return self.fail(node, "dequantizes with other parameters than it was quantized")
        self.value[node] = buffer  # the dequantized tensor *is* the 8-bit buffer, read as real

    def view(self, node: torch.fx.Node) -> None:
        source = node.args[0]
        shape = self.shape(node)
        if source in self.pending:  # a flatten before the output quantization: same buffer
            self.pending[node] = self.pending.pop(source)
            return
        buffer = self.value[source]
        if (self.batch is not None and str(node.meta["val"].shape[0]) != self.batch) or (
            node.target is aten.clone.default
            and node.kwargs.get("memory_format") not in (None, torch.contiguous_format)
        ):
            return self.fail(node, "views that move the batch dimension are not supported")
        view = Buffer(buffer.name, shape, buffer.scale, buffer.zero_point)
        self.value[node] = view

    def activation(self, node: torch.fx.Node) -> None:
        source = node.args[0]
        lo, hi = _bounds(node)
        if source in self.pending:  # fused into the layer's output clamp
            layer = self.pending.pop(source)
            layer.params["activation"] = (lo, hi)
            self.pending[node] = layer
            return
        buffer = self.quantized_input(source)
        if buffer is None:
            return self.fail(node, "an activation of a value the HLS program does not compute")
        qlo, qhi = _quantized_bounds(lo, hi, buffer.scale, buffer.zero_point)
        out = self.new_buffer(node, buffer.scale, buffer.zero_point)
        self.add_layer(node, "clamp", [buffer.name], out.name, {"lo": qlo, "hi": qhi})

    def linear_or_conv(self, node: torch.fx.Node) -> None:
        if node.target is aten.convolution.default:
            x, w, bias, stride, padding, dilation, transposed, _, groups = node.args
            kind = "conv2d"
            if transposed or len(stride) != 2:
                return self.fail(node, "only 2-D convolutions (not transposed)")
        elif node.target is aten.addmm.default:
            bias, x, w = node.args
            kind = "dense"
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                return self.fail(node, "addmm with alpha/beta != 1")
        else:
            (x, w), bias, kind = node.args, None, "dense"
        buffer, weight = self.quantized_input(x), self.weight(w)
        if buffer is None or weight is None:
            return self.fail(node, "a float layer (not quantized to int8): the FPGA computes int8")
        qweight, w_scales = weight
        if bias is not None and not (isinstance(bias, torch.fx.Node) and bias.op == "get_attr"):
            return self.fail(node, "bias is not a constant")
        fbias = get_attr_value(self.gm, bias) if bias is not None else torch.zeros(len(w_scales))
        qbias = int8.quantize_bias(fbias.float(), buffer.scale, w_scales)
        out_scale = (buffer.scale * w_scales.double()).float()  # dequantized accumulators
        params: dict[str, Any] = {"in_zero_point": buffer.zero_point, "activation": None}
        if kind == "conv2d":
            params.update(
                stride=list(stride),
                padding=list(padding),
                dilation=list(dilation),
                groups=int(groups),
                kernel=list(qweight.shape[2:]),
                in_shape=list(buffer.shape),
                out_shape=list(self.shape(node)),
            )
        # the accumulators' buffer: a float output, unless a quantize follows (it renames it)
        params["acc_bound"] = _accumulator_bound(qweight, qbias, buffer.zero_point)
        acc = self.new_buffer(node, None)
        tensors = {"weight": qweight, "bias": qbias, "acc_scale": out_scale}
        self.add_layer(node, kind, [buffer.name], acc.name, params, tensors, pending=True)

    def requantize_accumulators(self, layer: Layer, out: Buffer) -> None:
        """Output scale known: the integer multipliers to it (per channel acc_scale / out_scale
        for accumulators; in_scale[i] / out_scale for the inputs of an add or concat), and the
        fused activation as an 8-bit clamp."""
        self.buffers.pop(f"t_{layer.source}", None)
        if layer.kind == "add":
            ratios = [s / out.scale for s in layer.params.pop("in_scales")]
            multipliers, shift = int8.rescale_multipliers(ratios)
            layer.params.update(multipliers=multipliers, shift=shift)
        elif layer.kind == "concat":
            scales = layer.params.pop("in_scales")
            layer.params["parts"] = [int8.rescale_multipliers([s / out.scale]) for s in scales]
        else:
            real = layer.tensors.pop("acc_scale").double() / out.scale
            pairs = [int8.quantize_multiplier(float(r)) for r in real]
            layer.tensors["m0"] = torch.tensor([p[0] for p in pairs], dtype=torch.int32)
            layer.tensors["shift"] = torch.tensor([31 + p[1] for p in pairs], dtype=torch.int32)
        activation = layer.params.pop("activation") or (None, None)
        lo, hi = _quantized_bounds(*activation, out.scale, out.zero_point)
        layer.params.update(out_zero_point=out.zero_point, lo=lo, hi=hi)

    def maxpool(self, node: torch.fx.Node) -> None:
        x, kernel, *rest = node.args
        stride = rest[0] if len(rest) > 0 and rest[0] else kernel
        padding = rest[1] if len(rest) > 1 else [0, 0]
        dilation = rest[2] if len(rest) > 2 else [1, 1]
        ceil_mode = rest[3] if len(rest) > 3 else False
        buffer = self.quantized_input(x)
        if buffer is None:
            return self.fail(node, "max pool of a value the HLS program does not compute")
        if ceil_mode or list(dilation) != [1, 1]:
            return self.fail(node, "max pool with ceil_mode or dilation")
        out = Buffer(f"t_{node.name}", _pool_shape(node), buffer.scale, buffer.zero_point)
        self.buffers[out.name] = out
        self.value[node] = out
        params = {"kernel": _pair(kernel), "stride": _pair(stride), "padding": _pair(padding)}
        self.add_layer(node, "maxpool2d", [buffer.name], out.name, params)

    def batch_size(self, node: torch.fx.Node) -> None:
        if node.args[1] != 0:  # the batch size feeds views; other sizes are static here
            self.fail(node, "reads a dynamic size other than the batch (dim 0)")

    def getitem(self, node: torch.fx.Node) -> None:
        source, index = node.args
        if source in self.value and index == 0:
            self.value[node] = self.value[source]  # max_pool2d_with_indices: the values
            return
        if index == 1 and getattr(source, "target", None) is aten.max_pool2d_with_indices.default:
            if node.users:
                self.fail(node, "max pool indices are not computed on the FPGA")
            return
        self.fail(node, "getitem of a value the HLS program does not compute")

    def average(self, node: torch.fx.Node) -> None:
        x = node.args[0]
        buffer = self.quantized_input(x)
        if buffer is None:
            return self.fail(node, "average of a value the HLS program does not compute")
        c, h, w = buffer.shape
        if node.target is aten.avg_pool2d.default:
            kernel = _pair(node.args[1])
            stride = _pair(node.args[2]) if len(node.args) > 2 and node.args[2] else kernel
            padding = _pair(node.args[3]) if len(node.args) > 3 else [0, 0]
            ceil_mode = node.args[4] if len(node.args) > 4 else False
            include_pad = node.args[5] if len(node.args) > 5 else True
            divisor = node.args[6] if len(node.args) > 6 else None
            if ceil_mode or divisor is not None or (not include_pad and padding != [0, 0]):
                return self.fail(
                    node,
                    "avg pool with ceil_mode, divisor_override or "
                    "count_include_pad=False with padding",
                )
        elif node.target is aten.mean.dim:
            dims = sorted(d % 4 for d in node.args[1])
            if dims != [2, 3]:
                return self.fail(node, "mean over other dims than H, W")
            kernel, stride, padding = [h, w], [h, w], [0, 0]
        else:
            if list(node.args[1]) != [1, 1]:
                return self.fail(node, "adaptive average pool to other sizes than 1x1")
            kernel, stride, padding = [h, w], [h, w], [0, 0]
        params = {
            "acc_bound": kernel[0] * kernel[1] * _span(buffer.zero_point),
            "kernel": kernel,
            "stride": stride,
            "padding": padding,
            "in_zero_point": buffer.zero_point,
            "activation": None,
        }
        acc = self.new_buffer(node, None)
        scale = torch.tensor([buffer.scale / (kernel[0] * kernel[1])], dtype=torch.float32)
        tensors = {"acc_scale": scale}
        self.add_layer(node, "avgpool2d", [buffer.name], acc.name, params, tensors, pending=True)

    def add(self, node: torch.fx.Node) -> None:
        a, b = node.args[:2]
        if node.kwargs.get("alpha", 1) != 1:
            return self.fail(node, "add with alpha != 1")
        ins = [self.quantized_input(a), self.quantized_input(b)]
        if None in ins or ins[0].shape != ins[1].shape:
            return self.fail(
                node, "add of values the HLS program does not compute, or broadcasting"
            )
        self.rescaling(node, "add", ins)

    def concat(self, node: torch.fx.Node) -> None:
        values, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        ins = [self.quantized_input(v) for v in values]
        if None in ins:
            return self.fail(node, "concat of values the HLS program does not compute")
        if dim % (len(ins[0].shape) + 1) != 1:
            return self.fail(node, "concat along other dims than channels (dim 1)")
        self.rescaling(node, "concat", ins)

    def rescaling(self, node: torch.fx.Node, kind: str, ins: list[Buffer]) -> None:
        """add / concat: 8-bit inputs at their scales, rescaled to the output's (set by the
        quantize that follows: see `quantize`)."""
        acc = self.new_buffer(node, None)
        params = {
            "in_zero_points": [b.zero_point for b in ins],
            "activation": None,
            "in_scales": [b.scale for b in ins],
        }
        self.add_layer(node, kind, [b.name for b in ins], acc.name, params, pending=True)

    def add_layer(
        self,
        node: torch.fx.Node,
        kind: str,
        inputs: list[str],
        output: str,
        params: dict[str, Any],
        tensors: dict[str, torch.Tensor] | None = None,
        *,
        pending: bool = False,
    ) -> Layer:
        """Append a layer for `node`. pending: its output scale comes from the quantize that
        follows (`quantize`), or it stays float if it is a model output (`output`)."""
        name = f"L{len(self.layers)}_{node.name}"
        layer = Layer(name, kind, inputs, output, params, tensors or {}, node.name)
        self.layers.append(layer)
        if pending:
            self.pending[node] = layer
        return layer

    def output(self, node: Any) -> str | None:
        if node in self.failed:
            return None
        if node in self.pending:  # float output of a layer: dequantized accumulators
            layer = self.pending.pop(node)
            if layer.kind in ("add", "concat"):
                self.fail(node, f"{layer.kind} output not quantized (quantize with target='hls')")
                return None
            act = layer.params.pop("activation")
            layer.params["float_activation"] = _float_activation(act)
            return layer.output
        buffer = self.value.get(node)
        if buffer is None:
            self.fail(node, "an output the HLS program does not compute")
            return None
        if buffer.is_float:
            return buffer.name
        out = Buffer(f"t_{node.name}_out", buffer.shape)
        self.buffers[out.name] = out
        params = {"scale": buffer.scale, "zero_point": buffer.zero_point}
        self.add_layer(node, "dequantize", [buffer.name], out.name, params)
        return out.name


def accumulator_bits(layer: Layer) -> int:
    """Bits a layer's accumulator needs for any input (its worst-case bound, plus sign)."""
    return int(layer.params.get("acc_bound", 0)).bit_length() + 1


def accumulator_widths(program: Program) -> dict[str, int]:
    """`accumulator_bits` of every layer that accumulates (MAC layers, average pools)."""
    return {
        layer.name: accumulator_bits(layer)
        for layer in program.layers
        if "acc_bound" in layer.params
    }


def build_program(gm: torch.fx.GraphModule) -> Program:
    """The integer program of a QDQ graph quantized with target="hls".

    Raises:
        UnsupportedOpError: every node it cannot express, all at once.
    """
    program = _Builder(gm).run()
    _name_buffers(program)
    return program


def _name_buffers(program: Program) -> None:
    """Name every buffer after what fills it: in0.., <layer>_out."""
    names = {name: f"in{i}" for i, name in enumerate(program.inputs)}
    for layer in program.layers:
        names.setdefault(layer.output, f"{layer.name}_out")
    program.buffers = {names[k]: b for k, b in program.buffers.items() if k in names}
    for name, buffer in program.buffers.items():
        buffer.name = name
    for layer in program.layers:
        layer.inputs = [names[n] for n in layer.inputs]
        layer.output = names[layer.output]
    program.inputs = [names[n] for n in program.inputs]
    program.outputs = [names[n] for n in program.outputs]


def _pair(value: Any) -> list[int]:
    value = list(value) if isinstance(value, list | tuple) else [value]
    return [int(value[0]), int(value[-1])]


def _pool_shape(node: torch.fx.Node) -> tuple[int, ...]:
    val = node.meta["val"]
    val = val[0] if isinstance(val, tuple | list) else val
    return tuple(int(d) for d in val.shape[1:])


def _bounds(node: torch.fx.Node) -> tuple[float | None, float | None]:
    """The real-valued clamp of relu / hardtanh / clamp."""
    if node.target is aten.relu.default:
        return 0.0, None
    if node.target is aten.hardtanh.default:
        lo = node.args[1] if len(node.args) > 1 else -1.0
        hi = node.args[2] if len(node.args) > 2 else 1.0
        return float(lo), float(hi)
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def _quantized_bounds(
    lo: float | None, hi: float | None, scale: float, zero_point: int
) -> tuple[int, int]:
    """A real clamp [lo, hi] in the 8-bit domain (quantize is monotone, so clamping before or
    after quantizing gives the same value), within [0, 255]."""

    def q(v: float) -> int:
        return int(int8.quantize(torch.tensor([v]), scale, zero_point)[0])

    return (int8.ACT_QMIN if lo is None else q(lo)), (int8.ACT_QMAX if hi is None else q(hi))


def _float_activation(act: tuple[float | None, float | None] | None) -> list[float] | None:
    if act is None:
        return None
    lo, hi = act
    return [float("-inf") if lo is None else lo, float("inf") if hi is None else hi]


def _span(zero_point: int) -> int:
    """The largest |q - zero_point| of an 8-bit activation."""
    return max(zero_point - int8.ACT_QMIN, int8.ACT_QMAX - zero_point)


def _accumulator_bound(qweight: torch.Tensor, qbias: torch.Tensor, zero_point: int) -> int:
    """The largest |accumulator| any input can produce: sum |w| * max|x - zp| + |bias|, per
    output channel (the width the accumulator needs; it never wraps)."""
    weights = qweight.to(torch.int64).abs().flatten(1).sum(1)
    per_channel = weights * _span(zero_point) + qbias.to(torch.int64).abs()
    return int(per_channel.max())
