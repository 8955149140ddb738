"""quantize_weights: the linear layers of large models in int8/int4 (`graphopt.quantized_linear`).

Each matmul by a constant float32 weight becomes one call of the mode's op:
  * "int8_weight_only" / "int4_weight_only": the weight stored as int8 with a scale per output
    channel, or as int4 with a scale and zero point per group of input channels; activations
    stay float. For memory-bound layers (a batch-1 decode step reads every weight once), where
    int8 activations gain nothing and LLMs' outlier activation channels cost accuracy.
  * "int8_dynamic": int8 weights, activations quantized per token at run time, integer matmul:
    for compute-bound layers (prefill, batched serving). With `smoothquant=alpha`, each input
    channel j is divided by s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) (activation maxima from
    the calibration batches) and the weight multiplied by it, moving outliers into the weights.
No calibration data is needed but for SmoothQuant. The float weight is dropped by DCE.
Embedding tables (in every mode) become int8 with a scale per row: a lookup widens the rows
it reads.

    addmm(bias, x, W^T)  =>  graphopt.linear_int8_weight(x, int8(W), scale, bias)
    mm(x, W^T)           =>  graphopt.linear_int4_weight(x, packed(W), scale, zero, 128, None)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from graphopt import quantized_linear
from graphopt.config import Config
from graphopt.passes.base import (
    Emitter,
    PassResult,
    Site,
    constant_dim,
    fake_mode_of,
    find_sites,
    get_attr_value,
    insert_constant,
    layer_name,
)

MODES = quantized_linear.MODES


def quantize_weights(
    gm: torch.fx.GraphModule, cfg: Config, calibration: Sequence[Sequence[Any]] | None = None
) -> PassResult:
    """Quantize linear layers as `cfg.quantize` says (a no-op for other modes).

    Args:
        calibration: batches of real values for gm's placeholders; used for SmoothQuant
            (`cfg.smoothquant`), which needs at least one.
    """
    mode_name = cfg.quantize
    if mode_name not in MODES:
        return PassResult(gm, False, {})
    quantized_linear.load_kernels()
    int4 = mode_name == "int4_weight_only"
    summary = quantized_linear.LinearQuantSummary(
        mode_name, cfg.group_size if int4 else None, cfg.smoothquant
    )
    sites = [site for site in find_sites(gm) if site.kind == "linear"]
    act_max = {}
    if cfg.smoothquant is not None:
        if not calibration:
            raise ValueError("smoothquant needs calibration batches: calibration=[(x,), ...]")
        act_max = _input_channel_max(gm, sites, calibration)
    fake_mode = fake_mode_of(gm)
    for site in sites:
        node, transposed = site.node, get_attr_value(gm, site.weight)
        weight = transposed.t().contiguous()  # [out, in]: a linear layer's own layout
        bias = node.args[0] if node.target is torch.ops.aten.addmm.default else None
        if bias is not None and not _per_channel(bias, weight.shape[0]):
            summary.kept_float.append(f"{site.name} (a bias of another shape than [out])")
            continue
        if int4 and weight.shape[1] % cfg.group_size:
            summary.kept_float.append(
                f"{site.name} ({weight.shape[1]} input channels, not whole groups of "
                f"{cfg.group_size})"
            )
            continue
        act_mul = None
        if site.act in act_max:
            act_mul = 1 / _smoothing(act_max[site.act], weight, cfg.smoothquant)
        tensors = quantized_linear.quantize_linear_weight(
            weight, mode_name, cfg.group_size, act_mul
        )
        nodes = {
            name: insert_constant(gm, t, f"{site.name}_{name}", node)
            for name, t in tensors.items()
            if t is not None
        }
        op, args = quantized_linear.quantized_linear_call(
            mode_name, site.act, nodes, bias, cfg.group_size
        )
        new = Emitter(gm, node, fake_mode)(op, *args)
        new.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        summary.layers.append(
            quantized_linear.LayerBytes(
                site.name,
                tuple(weight.shape),
                quantized_linear.nbytes(transposed),
                quantized_linear.nbytes(*tensors.values()),
            )
        )
    for node in _embedding_lookups(gm):
        _quantize_embedding(gm, node, fake_mode, summary)
    if not summary.layers:
        return PassResult(gm, False, {"kept_float": len(summary.kept_float)})
    gm.graph.lint()
    gm.recompile()
    gm.meta["graphopt.quantization"] = summary
    stats = {
        "quantized": len(summary.layers),
        "kept_float": len(summary.kept_float),
        "weight_bytes_saved": summary.float_bytes - summary.quantized_bytes,
    }
    return PassResult(gm, True, stats)


def _embedding_lookups(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """`aten.embedding` nodes reading a constant float32 table (2-D)."""
    return [
        node
        for node in gm.graph.nodes
        if node.op == "call_function"
        and node.target is torch.ops.aten.embedding.default
        and constant_dim(gm, node.args[0]) == 2
    ]


def _quantize_embedding(
    gm: torch.fx.GraphModule,
    node: torch.fx.Node,
    fake_mode: Any,
    summary: quantized_linear.LinearQuantSummary,
) -> None:
    """embedding(table, ids) => embedding(int8 table, ids) * embedding(row scales, ids), as
    `quantized_linear.QuantizedEmbedding` does (every mode: a lookup reads a few rows)."""
    aten = torch.ops.aten
    table, ids = get_attr_value(gm, node.args[0]), node.args[1]
    tensors = quantized_linear.quantize_linear_weight(table, "int8_weight_only")
    name = layer_name(node)
    q = insert_constant(gm, tensors["weight"], f"{name}_weight", node)
    scale = insert_constant(gm, tensors["scale"][:, None].contiguous(), f"{name}_scale", node)
    emit = Emitter(gm, node, fake_mode)
    rows = emit(aten._to_copy.default, emit(aten.embedding.default, q, ids), dtype=torch.float32)
    new = emit(aten.mul.Tensor, rows, emit(aten.embedding.default, scale, ids))
    new.meta["stack_trace"] = node.meta.get("stack_trace")
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    summary.layers.append(
        quantized_linear.LayerBytes(
            name,
            tuple(table.shape),
            quantized_linear.nbytes(table),
            quantized_linear.nbytes(*tensors.values()),
        )
    )


def _smoothing(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s = max|x|^alpha / max|w|^(1 - alpha)."""
    w_max = weight.abs().amax(0).clamp_min(1e-5)
    s = act_max.clamp_min(1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp_min(1e-5)


class _ChannelMax(torch.fx.Interpreter):
    """Runs the graph, keeping the running max |value| per last-dim channel of some nodes."""

    def __init__(self, gm: torch.fx.GraphModule, watched: set, found: dict) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.watched, self.found = watched, found

    def run_node(self, node: torch.fx.Node) -> Any:
        out = super().run_node(node)
        if node in self.watched:
            seen = out.detach().abs().float().reshape(-1, out.shape[-1]).amax(0)
            old = self.found.get(node)
            self.found[node] = seen if old is None else torch.maximum(old, seen)
        return out


def _input_channel_max(
    gm: torch.fx.GraphModule, sites: list[Site], batches: Sequence[Sequence[Any]]
) -> dict[torch.fx.Node, torch.Tensor]:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    found: dict[torch.fx.Node, torch.Tensor] = {}
    watched = {site.act for site in sites}
    with unset_fake_temporarily(), torch.no_grad():
        for batch in batches:
            _ChannelMax(gm, watched, found).run(*batch)
    return found


def _per_channel(bias: object, channels: int) -> bool:
    if not isinstance(bias, torch.fx.Node):
        return False
    value = bias.meta.get("val")
    return (
        isinstance(value, torch.Tensor)
        and value.dtype == torch.float32
        and tuple(value.shape) == (channels,)
    )
