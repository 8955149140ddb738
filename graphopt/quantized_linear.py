"""Quantized linear layers for large models: weight-only int8/int4 and dynamic int8.

Three ops carry the modes through every path (the graph pass
`graphopt/passes/quantize_weights.py`, the module swap `quantize_weights_`, inductor's
generated code, PyTorch fallbacks):

    graphopt::linear_int8_weight(x, weight int8 [N, K], scale [N], bias?)
        y = x @ (weight * scale[:, None]).T + bias
        (the weight may also come tiled, [N/4, K/64, 4, 64]: see `tile_int8`)
    graphopt::linear_int4_weight(x, weight uint8 [N, K/2], scale [N, K/g], zero [N, K/g], g, bias?)
        y = x @ ((q - zero) * scale).T + bias, q the 4-bit values, g the group size
    graphopt::linear_int8_dynamic(x, weight int8 [N, K], scale [N], act_mul [K]?, bias?)
        x' = x * act_mul; each row of x' quantized to int8 with its own scale (absmax / 127);
        y = (int8(x') @ weight.T, in int32) * row scale * scale + bias

Weight-only ("int8_weight_only", "int4_weight_only"): activations stay float. Their CPU
kernels are graphopt's own (`graphopt/kernels/weight_only.cpp`: the weights widened to
float32 in registers next to the multiply-add, so a decode step reads 1 or 0.5 bytes per
weight); the implementations here are the reference those kernels are tested against, and
what runs where the kernels cannot be built. Dynamic int8 ("int8_dynamic") quantizes the
activations per token at run time and multiplies in integers (`torch._int_mm`: oneDNN's
VNNI/AMX kernels); it is defined by its decomposition into ATen ops, which inductor fuses
around the integer matmul. `act_mul` is SmoothQuant's per-channel smoothing (the weight holds
its inverse), computed from calibration batches when `smoothquant` is set.

int8 weights: one symmetric scale per output channel (`graphopt.int8.quantize_weight`, as the
static int8 path). int4: per group of `group_size` input channels, an asymmetric range: scale
= (max - min) / 15 and a float zero point, so the group's min and max are exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from graphopt.int8 import quantize_weight

log = logging.getLogger("graphopt")

GROUP_SIZES = (32, 64, 128)
INT4_BLOCK = 32  # input channels per packed block (16 bytes, see `pack_int4`)

_LIBRARY = torch.library.Library("graphopt", "FRAGMENT")  # noqa: TOR901 - lives with the process
_LIBRARY.define("linear_int8_weight(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor")
_LIBRARY.define(
    "linear_int4_weight(Tensor x, Tensor weight, Tensor scale, Tensor zero, int group_size, "
    "Tensor? bias) -> Tensor"
)
_LIBRARY.define(
    "linear_int8_dynamic(Tensor x, Tensor weight, Tensor scale, Tensor? act_mul, Tensor? bias) "
    "-> Tensor"
)
MODES = ("int8_weight_only", "int4_weight_only", "int8_dynamic")


INT8_TILE = (4, 64)  # the tiled int8 layout: rows x input channels per tile


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return untile_int8(weight).float() * scale.float()[:, None]


def tileable_int8(weight: torch.Tensor) -> bool:
    rows, channels = INT8_TILE
    return weight.dim() == 2 and weight.shape[0] % rows == 0 and weight.shape[1] % channels == 0


def tile_int8(weight: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> [N/4, K/64, 4, 64]: each tile holds 4 rows' 64 channels, the tiles of a
    group of 4 rows one after another. The CPU kernel's GEMV then reads the whole weight as
    one sequential stream (reading 4 rows of [N, K] at once is 4 streams, which the hardware
    prefetchers serve at about half the bandwidth; `python -m benchmarks.llm --kernels-only`
    times both). N must be a multiple of 4 and K of 64 (`tileable_int8`)."""
    rows, channels = INT8_TILE
    n, k = weight.shape
    tiles = weight.view(n // rows, rows, k // channels, channels)
    return tiles.transpose(1, 2).contiguous()


def untile_int8(weight: torch.Tensor) -> torch.Tensor:
    """The [N, K] view of an int8 weight in either layout (a copy for a tiled one)."""
    if weight.dim() == 2:
        return weight
    groups, chunks, rows, channels = weight.shape
    return weight.transpose(1, 2).reshape(groups * rows, chunks * channels)


def int8_kernel_layout(weight: torch.Tensor) -> torch.Tensor:
    """An int8 [N, K] weight in the CPU kernels' tiled layout where its shape tiles, else as
    it is (also a weight already tiled)."""
    return tile_int8(weight) if tileable_int8(weight) else weight


def int8_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(N, K) of an int8 weight of `shape`, in either layout."""
    if len(shape) == 4:
        return shape[0] * shape[2], shape[1] * shape[3]
    return shape[0], shape[1]


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    q = unpack_int4(packed).float()
    n, k = q.shape
    grouped = q.view(n, k // group_size, group_size)
    return ((grouped - zero.float()[..., None]) * scale.float()[..., None]).view(n, k)


@torch.library.impl(_LIBRARY, "linear_int8_weight", "CompositeExplicitAutograd")
def _linear_int8_reference(x, weight, scale, bias=None):
    return torch.nn.functional.linear(x, dequantize_int8(weight, scale).to(x.dtype), bias)


@torch.library.impl(_LIBRARY, "linear_int4_weight", "CompositeExplicitAutograd")
def _linear_int4_reference(x, weight, scale, zero, group_size, bias=None):
    w = dequantize_int4(weight, scale, zero, group_size).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@torch.library.impl(_LIBRARY, "linear_int8_dynamic", "CompositeImplicitAutograd")
def _linear_int8_dynamic(x, weight, scale, act_mul=None, bias=None):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    if act_mul is not None:
        x2 = x2 * act_mul
    row_scale = (x2.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
    q = torch.round(x2 / row_scale).clamp(-127, 127).to(torch.int8)
    acc = torch._int_mm(q, weight.t())
    # One multiply by the outer product of the scales, not two: inductor's freezing rewrites
    # _int_mm -> mul(row scale) -> mul(channel scale) (torchao's SmoothQuant pattern) into
    # oneDNN's qlinear, whose path for this case (symmetric int8 activations) is orders of
    # magnitude slower than _int_mm on some x86 CPUs (AMD Zen 4 here)
    # (tests/test_quantized_linear.py::test_dynamic_int8_stays_on_int_mm checks the op run).
    y = acc.float() * (row_scale * scale.float())
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], weight.shape[0]).to(x.dtype)


@torch.library.register_fake("graphopt::linear_int8_weight", lib=_LIBRARY)
def _linear_int8_fake(x, weight, scale, bias=None):
    return x.new_empty((*x.shape[:-1], int8_shape(weight.shape)[0]))


@torch.library.register_fake("graphopt::linear_int4_weight", lib=_LIBRARY)
def _linear_int4_fake(x, weight, scale, zero, group_size, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _register_flops() -> None:
    """FLOPs of the two ops for reports (torch's flop counter knows only its own ops)."""
    from math import prod

    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.graphopt.linear_int8_weight)
    def _int8(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * prod(x_shape) * int8_shape(w_shape)[0]

    @register_flop_formula(torch.ops.graphopt.linear_int4_weight)
    def _int4(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * prod(x_shape) * w_shape[0]


_register_flops()


def load_kernels() -> bool:
    """Graphopt's CPU kernels for the two ops (built on first use); False: the reference."""
    from graphopt import kernels

    return kernels.load("weight_only")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], scale [N]) for a float [N, K] weight: one scale per output channel."""
    return quantize_weight(weight, axis=0)


def quantize_int4(
    weight: torch.Tensor, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K/2], scale [N, K/g], zero [N, K/g]) for a float [N, K] weight."""
    n, k = weight.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(
            f"int4 weights need input channels in whole groups: {k} channels, group_size "
            f"{group_size} (accepted group sizes: {list(GROUP_SIZES)})"
        )
    grouped = weight.detach().float().view(n, k // group_size, group_size)
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    zero = -lo / scale
    q = torch.round(grouped / scale[..., None] + zero[..., None]).clamp(0, 15)
    return pack_int4(q.view(n, k).to(torch.uint8)), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> [N, K/2]: in each block of 32 channels k0.., byte j holds
    channel k0 + j in its low nibble and k0 + 16 + j in its high one (a 16-byte load gives 32
    channels: one mask and one shift, no shuffle)."""
    n, k = q.shape
    blocks = q.view(n, k // INT4_BLOCK, 2, INT4_BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    blocks = packed.view(n, half // (INT4_BLOCK // 2), INT4_BLOCK // 2)
    return torch.stack([blocks & 15, blocks >> 4], dim=2).reshape(n, half * 2)


@dataclass
class LayerBytes:
    layer: str
    shape: tuple[int, int]
    float_bytes: int
    quantized_bytes: int  # weights plus scales (and zero points, smoothing factors)


@dataclass
class LinearQuantSummary:
    """What `quantize_weights` / `quantize_weights_` did: per layer, and for the model."""

    mode: str
    group_size: int | None = None
    smoothquant: float | None = None
    layers: list[LayerBytes] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)  # layers left in float, with why

    @property
    def float_bytes(self) -> int:
        return sum(layer.float_bytes for layer in self.layers)

    @property
    def quantized_bytes(self) -> int:
        return sum(layer.quantized_bytes for layer in self.layers)

    def __str__(self) -> str:
        ratio = self.float_bytes / max(self.quantized_bytes, 1)
        detail = [f"group {self.group_size}"] if self.group_size else []
        if self.smoothquant is not None:
            detail.append(f"SmoothQuant alpha {self.smoothquant}")
        how = f" ({', '.join(detail)})" if detail else ""
        lines = [
            f"{self.mode}{how}: "
            f"{len(self.layers)} layers, {self.float_bytes / 1e6:.1f} MB -> "
            f"{self.quantized_bytes / 1e6:.1f} MB of weights ({ratio:.2f}x smaller)"
        ]
        lines += [f"  kept float: {why}" for why in self.kept_float]
        return "\n".join(lines)


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# Rows of a weight quantized at a time: the float temporaries of quantizing stay a few MB
# however large the layer (a whole [32000, 4096] lm_head would take four 0.5 GB copies).
QUANTIZE_ROWS = 2048


def quantize_linear_weight(
    weight: torch.Tensor, mode: str, group_size: int = 128, act_mul: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The tensors `mode`'s op reads besides x and the bias, by argument name, for a float
    [N, K] weight (with SmoothQuant's `act_mul`, the weight is scaled by its inverse first).
    Every scale is per output channel or per group within one, so the weight is quantized
    `QUANTIZE_ROWS` rows at a time."""
    blocks = []
    for rows in weight.detach().split(QUANTIZE_ROWS):
        if mode == "int4_weight_only":
            blocks.append(dict(zip(("weight", "scale", "zero"), quantize_int4(rows, group_size))))
        else:
            rows = rows / act_mul if act_mul is not None else rows
            blocks.append(dict(zip(("weight", "scale"), quantize_int8(rows))))
    out = {name: torch.cat([block[name] for block in blocks]) for name in blocks[0]}
    if mode == "int8_dynamic":
        out["act_mul"] = act_mul
    return out


def quantized_linear_call(
    mode: str, x: Any, tensors: dict[str, Any], bias: Any, group_size: int = 128
) -> tuple[torch._ops.OpOverload, tuple[Any, ...]]:
    """(`mode`'s op, its arguments) for x and the tensors of `quantize_linear_weight`; x and
    the tensors may be tensors or FX nodes (the graph pass emits the call)."""
    ops, t = torch.ops.graphopt, tensors
    if mode == "int8_weight_only":
        return ops.linear_int8_weight.default, (x, t["weight"], t["scale"], bias)
    if mode == "int4_weight_only":
        args = (x, t["weight"], t["scale"], t["zero"], group_size, bias)
        return ops.linear_int4_weight.default, args
    return ops.linear_int8_dynamic.default, (x, t["weight"], t["scale"], t.get("act_mul"), bias)


def linear_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The [out, in] weight of a linear layer: `nn.Linear`, or transformers' `Conv1D` (GPT-2's
    layers, which hold it as [in, out]); None for any other module."""
    if type(module) is torch.nn.Linear:
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils
        return module.weight.t()
    return None


class QuantizedLinear(torch.nn.Module):
    """A linear layer in one of `MODES` (see the module docstring): what `quantize_weights_`
    puts in place of `nn.Linear` (or transformers' `Conv1D`). Holds only the quantized weight,
    its scales and the bias; an int8 weight-only weight in the kernels' tiled layout where its
    shape allows (`tile_int8`). `tensors`: the quantized weight and scales, when already made
    (a tied weight quantized once for its embedding and its output layer)."""

    def __init__(
        self,
        linear: torch.nn.Module,
        mode: str,
        group_size: int = 128,
        act_mul: torch.Tensor | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        weight = linear_weight(linear)
        if weight is None:
            raise TypeError(f"QuantizedLinear takes nn.Linear or Conv1D, got {type(linear)}")
        self.out_features, self.in_features = weight.shape
        self.mode, self.group_size = mode, group_size
        if tensors is None:
            tensors = quantize_linear_weight(weight.detach(), mode, group_size, act_mul)
        if mode == "int8_weight_only":
            tensors = {**tensors, "weight": int8_kernel_layout(tensors["weight"])}
        for name in ("weight", "scale", "zero", "act_mul"):
            value = tensors.get(name)
            self.register_buffer(name, value.contiguous() if value is not None else None)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = {"weight": self.weight, "scale": self.scale}
        tensors |= {"zero": self.zero, "act_mul": self.act_mul}
        op, args = quantized_linear_call(self.mode, x, tensors, self.bias, self.group_size)
        return op(*args)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4_weight_only" else ""
        return f"{self.in_features}, {self.out_features}, {self.mode}{group}"


class QuantizedEmbedding(torch.nn.Module):
    """An `nn.Embedding` whose table is int8 with one scale per row: a lookup reads the rows it
    needs and widens them (what `quantize_weights_` does to embeddings; a 32000 x 4096 table
    shrinks from 524 MB to 131 MB). Rows come out in the table's float dtype. `tiled`: store
    the table in the tiled layout of the int8 weight-only kernels (`tile_int8`), so that a
    tied output layer reads the same tensor."""

    def __init__(
        self, embedding: torch.nn.Embedding, tensors: dict[str, torch.Tensor], tiled: bool = False
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        self.dtype = embedding.weight.dtype
        weight = int8_kernel_layout(tensors["weight"]) if tiled else tensors["weight"]
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", tensors["scale"].contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 4:  # tiled (shared with a tied int8 output layer): row n is
            rows_per_tile = self.weight.shape[2]  # tile row n % 4 of tile group n // 4
            picked = self.weight[ids // rows_per_tile, :, ids % rows_per_tile]
            int8_rows = picked.reshape(*ids.shape, self.embedding_dim)
        else:
            int8_rows = self.weight[ids]
        rows = int8_rows.to(torch.float32) * self.scale[ids].unsqueeze(-1)
        return rows.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


def _quantized_layer(
    name: str,
    module: torch.nn.Module,
    weight: torch.Tensor,
    mode: str,
    group_size: int,
    exclude: tuple[str, ...],
    summary: LinearQuantSummary,
    shared: dict[str, torch.Tensor] | None,
) -> QuantizedLinear | QuantizedEmbedding | None:
    """The quantized replacement of one layer of `quantize_weights_` (None: it stays float, and
    the summary says why). `shared`: the int8 tensors of the same weight, already quantized
    for another layer that uses it (tied embeddings)."""
    import fnmatch

    if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
        summary.kept_float.append(f"{name} (excluded)")
        return None
    if isinstance(module, torch.nn.Embedding):
        return QuantizedEmbedding(
            module,
            shared or quantize_linear_weight(weight, "int8_weight_only"),
            tiled=mode == "int8_weight_only",
        )
    if mode == "int4_weight_only":
        if weight.shape[1] % group_size:
            summary.kept_float.append(
                f"{name} ({weight.shape[1]} input channels, not whole groups of {group_size})"
            )
            return None
        shared = None  # the table's int8 rows are no int4 groups
    return QuantizedLinear(module, mode, group_size, tensors=shared)


def _plain_embedding(module: torch.nn.Module) -> bool:
    """An `nn.Embedding` whose forward is a plain lookup (no max_norm renormalization, which
    writes to the table)."""
    return type(module) is torch.nn.Embedding and module.max_norm is None


def check_mode(mode: str, group_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"quantize mode {mode!r}: accepted values: {list(MODES)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(
            f"graphopt option 'group_size' got {group_size!r}; accepted values: {list(GROUP_SIZES)}"
        )


def quantize_weights_(
    model: torch.nn.Module,
    mode: str = "int8_weight_only",
    *,
    group_size: int = 128,
    exclude: tuple[str, ...] = (),
    embeddings: bool = True,
) -> LinearQuantSummary:
    """Replace every linear layer of `model` (`nn.Linear`, transformers' `Conv1D`) by a
    `QuantizedLinear`, and every `nn.Embedding` by a `QuantizedEmbedding`, in place.

    The float weights are dropped as each layer is quantized (what is kept is 1 or 0.5 byte
    per weight plus scales), so the process never holds a second copy of the model, and a
    model quantized before `torch.compile(model.forward, backend="graphopt")` or `generate()`
    never holds its float weights again. A weight shared by an embedding and an output layer
    (tied embeddings) is quantized once when both are int8. Layers whose input channels do
    not fill whole int4 groups, and those matching `exclude` (glob patterns of module names),
    stay float and are listed in the summary.

    Args:
        mode: "int8_weight_only", "int4_weight_only" or "int8_dynamic" (SmoothQuant needs
            calibration data: use the `quantize="int8_dynamic", smoothquant=...` option).
        group_size: input channels per int4 scale (32, 64 or 128).
        exclude: glob patterns of module names to leave in float (e.g. "lm_head").
        embeddings: store embedding tables as int8 rows (every mode); False keeps them float.
    Returns:
        A `LinearQuantSummary`: bytes per layer before and after.
    """
    import collections

    check_mode(mode, group_size)
    load_kernels()
    summary = LinearQuantSummary(mode, group_size if mode == "int4_weight_only" else None)

    def float_weight(module: torch.nn.Module) -> torch.Tensor | None:
        if embeddings and _plain_embedding(module):
            return module.weight
        return linear_weight(module)

    # Names only: holding the modules would keep every float weight alive to the end. A weight
    # is known by id() only while a layer still holds it (`users` counts them down).
    names = [name for name, module in model.named_modules() if float_weight(module) is not None]
    users = collections.Counter(id(model.get_submodule(name).weight) for name in names)
    int8_of: dict[int, dict[str, torch.Tensor]] = {}  # id(tied float weight) -> int8 tensors
    counted: set[int] = set()  # ids of the tensors the summary has counted (all still alive)
    for name in [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]:
        if embeddings and name not in names:
            kind = type(model.get_submodule(name)).__name__
            summary.kept_float.append(f"{name} ({kind}: not a plain nn.Embedding lookup)")
    for name in names:
        module = model.get_submodule(name)
        if not name:
            raise TypeError(
                f"quantize_weights_ swaps the layers inside a model in place; got a bare "
                f"{type(module).__name__}: wrap it in a module (e.g. nn.Sequential)"
            )
        weight, key = float_weight(module), id(module.weight)
        users[key] -= 1
        quantized = _quantized_layer(
            name, module, weight, mode, group_size, exclude, summary, int8_of.get(key)
        )
        if quantized is not None:
            int8_rows = getattr(quantized, "mode", "int8") != "int4_weight_only"
            if int8_rows and users[key]:  # tied: the next user shares the int8 tensors
                int8_of[key] = {"weight": quantized.weight, "scale": quantized.scale}
            new = [t for t in quantized.buffers() if id(t) not in counted]
            old = [t for t in (module.weight, getattr(module, "bias", None)) if t is not None]
            summary.layers.append(
                LayerBytes(
                    name,
                    tuple(weight.shape),
                    nbytes(*(t for t in old if id(t) not in counted)),
                    nbytes(*new),
                )
            )
            counted.update(id(t) for t in new)
            if users[key]:
                counted.add(key)  # still alive: held by its next user
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, quantized)
        if not users[key]:
            int8_of.pop(key, None)
            counted.discard(key)
        del module, weight, quantized
    log.info("graphopt: %s", summary)
    return summary
