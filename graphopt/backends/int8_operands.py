"""What an integer convolution or matmul reads from a QDQ graph, for every backend's rules.

graphopt's quantize pass (and PT2E) leaves `conv(dequantize_per_tensor(q_x),
dequantize_per_channel(q_w))`. A backend computes that layer in integers, exactly, as
`(q_x - z_x) (*) (q_w - z_w)` summed in int32, times `x_scale * w_scale[c]`, when the sums
cannot overflow int32. `match` finds the two dequantizes and decides that; each backend's rule
then builds the operands in its own IR (`backends/tvm/rules/quantized.py`,
`backends/xla/rules/quantized.py`), which is why the TVM and XLA int8 paths give the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx

from graphopt.backends.registry import Check, static_scalars
from graphopt.passes.base import named_args as args

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

INT8_TYPES = (torch.uint8, torch.int8)


@dataclass(frozen=True)
class Int8Operands:
    """An integer layer's operands, as fx nodes and Python values.

    Attributes:
        x: the activation's 8-bit values (the dequantize's input node).
        x_zero_point: its zero point.
        x_scale: its scale.
        weight: the weight's 8-bit values (the dequantize's input node), as stored.
        zero_points: the weight's zero points (int64, one per channel), or None for none.
        scales: the node of the weight's per-channel scales.
        channel_axis: the weight's output-channel axis, as stored.
        transpose: the layer reads the stored 2-d weight transposed (a linear layer's).
    """

    x: torch.fx.Node
    x_zero_point: int
    x_scale: float
    weight: torch.fx.Node
    zero_points: np.ndarray | None
    scales: torch.fx.Node
    channel_axis: int
    transpose: bool


def _axis(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def dequantized_activation(arg: Any) -> dict[str, Any] | None:
    """dequantize_per_tensor's arguments when `arg` is one of 8-bit values with a static scale
    and zero point, else None."""
    if not (isinstance(arg, torch.fx.Node) and arg.target is qd.dequantize_per_tensor.default):
        return None
    a = args(arg)
    static = isinstance(a["scale"], float | int) and isinstance(a["zero_point"], int)
    if not static or a["out_dtype"] not in (None, torch.float32):
        return None
    return a if a["input"].meta["val"].dtype in INT8_TYPES else None


def per_channel_weight(arg: Any, out_axis: int) -> dict[str, Any] | None:
    """dequantize_per_channel's arguments when `arg` is one of 8-bit values whose channels
    lie along `out_axis` of `arg` (the output channels of the conv or matmul), else None. A
    transposed 2-d weight (permute [1, 0] or t, as linear layers have) counts: "transpose" is
    set in the result, and "channel_axis" is the axis as stored."""
    transpose = False
    if isinstance(arg, torch.fx.Node) and arg.target in (aten.permute.default, aten.t.default):
        if arg.args[0].meta["val"].dim() != 2:
            return None
        if arg.target is aten.permute.default and [_axis(d, 2) for d in arg.args[1]] != [1, 0]:
            return None
        arg, transpose, out_axis = arg.args[0], True, 1 - out_axis
    if not (isinstance(arg, torch.fx.Node) and arg.target is qd.dequantize_per_channel.default):
        return None
    a = args(arg)
    ndim = a["input"].meta["val"].dim()
    if a["out_dtype"] not in (None, torch.float32) or _axis(a["axis"], ndim) != out_axis:
        return None
    if a["input"].meta["val"].dtype not in INT8_TYPES:
        return None
    return {**a, "transpose": transpose, "channel_axis": out_axis}


def qdq_check(lowered_to: str) -> Check:
    """A check for the quantize/dequantize ops: float32 values and scales, a nonzero per-tensor
    scale, Python-number scalars."""

    def check(node: torch.fx.Node, cfg: Any) -> str | None:
        a = args(node)
        if a.get("out_dtype") not in (None, torch.float32):
            return f"dequantize to {a['out_dtype']} ({lowered_to} rule: float32)"
        if node.target is qd.quantize_per_tensor.default and not a["scale"]:
            return "quantization scale 0"
        if node.target is qd.quantize_per_channel.default:
            if a["scales"].meta["val"].dtype != torch.float32:
                return "quantize_per_channel with non-float32 scales"
        return static_scalars(node, cfg)

    return check


def match(
    activation: Any,
    weight: Any,
    out_axis: int,
    constant: Callable[[torch.fx.Node], np.ndarray | None],
) -> Int8Operands | None:
    """The operands of an integer layer reading `activation` and `weight` (the layer's fx
    arguments; the weight's output channels along `out_axis` as the layer reads it), or None:
    the layer computes in float.

    `constant(node)` gives a graph constant's values (a frozen weight), None for anything
    else. The weight's zero points must be constants. Products are exact in int16 operands
    (8-bit values minus their zero points); None when an operand leaves int16 or a sum over
    one output channel could overflow int32, bounded from the weight's values when they are
    constants, else from its dtype's range over the whole reduction.
    """
    act = dequantized_activation(activation)
    w = per_channel_weight(weight, out_axis)
    if act is None or w is None:
        return None
    zero_points = None
    if w["zero_points"] is not None:
        zero_points = constant(w["zero_points"])
        if zero_points is None:
            return None
        zero_points = zero_points.astype(np.int64)
    info = torch.iinfo(act["input"].meta["val"].dtype)
    zx = act["zero_point"]
    act_bound = max(abs(info.min - zx), abs(info.max - zx))
    axis = w["channel_axis"]
    values = constant(w["input"])
    if values is not None:
        rows = np.moveaxis(values.astype(np.int64), axis, 0).reshape(values.shape[axis], -1)
        if zero_points is not None:
            rows = rows - zero_points.reshape(-1, 1)
        w_bound = int(np.abs(rows).max(initial=0))
        row_sum = int(np.abs(rows).sum(axis=1).max(initial=0))
    else:
        winfo = torch.iinfo(w["input"].meta["val"].dtype)
        w_bound = max(abs(winfo.min), abs(winfo.max))
        if zero_points is not None and zero_points.size:
            w_bound += int(np.abs(zero_points).max())
        shape = w["input"].meta["val"].shape
        if any(isinstance(d, torch.SymInt) for d in shape):
            return None
        row_sum = w_bound * math.prod(shape) // max(int(shape[axis]), 1)
    if act_bound >= 1 << 15 or w_bound >= 1 << 15 or act_bound * row_sum >= 1 << 31:
        return None
    return Int8Operands(
        x=act["input"],
        x_zero_point=zx,
        x_scale=float(act["scale"]),
        weight=w["input"],
        zero_points=zero_points,
        scales=w["scales"],
        channel_axis=axis,
        transpose=w["transpose"],
    )
