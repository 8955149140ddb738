"""prune: remove channels (smaller tensors, faster on every backend) or zero single weights.

`structured=True` removes whole channels: `graphopt.passes.channel_groups` finds which layers'
channels are coupled (residual adds, depthwise convs, concats, flattens); each group that can
change keeps the `1 - sparsity` fraction of its channels with the largest importance, and every
constant those channels reach is cut to its smaller shape. The model's outputs keep their
shapes (a group that reaches an output is never pruned).

`structured=False` zeroes single weights of conv/linear layers by magnitude: the `sparsity`
fraction of each layer (`prune_scope="layer"`) or of all of them together ("global"), or
N of every M along the input channels (`prune_pattern="2:4"`). No backend here runs sparse
kernels, so those zeros save storage (compressed), not time; the report says so.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from graphopt.config import Config
from graphopt.passes.base import (
    PassResult,
    Site,
    fake_mode_of,
    fake_value,
    find_sites,
    get_attr_value,
    insert_constant,
)
from graphopt.passes.channel_groups import ChannelAnalysis, ChannelGroup
from graphopt.report import count_params, node_flops

Importance = Callable[[list[torch.Tensor]], torch.Tensor]

STORAGE_ONLY = (
    "unstructured and N:M zeros save storage only: the backends here (inductor, TVM, ONNX, HLS) "
    "run dense kernels, so they take as long as before; structured=True removes work"
)


@dataclass
class LayerPrune:
    """One conv/linear layer before and after the pass (kept in the report)."""

    layer: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    params_before: int
    params_after: int  # nonzero weights for unstructured pruning
    flops_before: int
    flops_after: int
    bytes_before: int
    bytes_after: int


@dataclass
class PruneSummary:
    """What the prune pass did: the method, per layer numbers, and the groups left whole."""

    method: str  # "channels", "magnitude (layer)", "magnitude (global)" or "2:4"
    sparsity: float
    layers: list[LayerPrune] = field(default_factory=list)
    groups_pruned: int = 0
    groups_fixed: dict[str, list[str]] = field(default_factory=dict)  # reason -> layer names
    note: str = ""


def prune(gm: torch.fx.GraphModule, cfg: Config) -> PassResult:
    """Prune the conv/linear layers of a frozen ATen graph to `cfg.sparsity`.

    Before -> after (structured, sparsity=0.5, a residual block of 64 channels):
        y = convolution(x, W1[64, 64, 3, 3]); z = convolution(relu(y), W2[64, 64, 3, 3]); x + z
        -> y = convolution(x, W1[32, 64, 3, 3]); z = convolution(relu(y), W2[64, 32, 3, 3])
        (the block's output channels are tied to x by the add: they go only if x's producers'
        channels go too, which they do when the whole residual stream is prunable.)

    Args:
        gm: a frozen core-ATen graph with meta["val"]; changed in place. Weights must be
            constants (BatchNorm folded): run after fold_batchnorm and fold_constants.
        cfg: sparsity, structured, prune_pattern, prune_scope, prune_importance,
            prune_round_to, prune_exclude.

    Returns:
        PassResult with stats {"channels_removed", "groups_pruned", "params_removed"}
        (structured) or {"weights_zeroed", "layers_pruned"}; gm.meta["graphopt.pruning"]
        holds a `PruneSummary`.
    """
    sites = find_sites(gm)  # the layers stay the same nodes; only their weight arguments change
    before = [_layer_numbers(gm, s) for s in sites]
    if cfg.structured:
        summary, stats = _prune_channels(gm, cfg)
    else:
        kept = [s for s in sites if not _excluded(s.name, cfg.prune_exclude)]
        summary, stats = _prune_weights(gm, cfg, kept)
    modified = any(stats.values())
    for site, (shape, params, flops, nbytes) in zip(sites, before):
        shape2, params2, flops2, nbytes2 = _layer_numbers(gm, site, nonzero=not cfg.structured)
        summary.layers.append(
            LayerPrune(site.name, shape, shape2, params, params2, flops, flops2, nbytes, nbytes2)
        )
    gm.meta["graphopt.pruning"] = summary
    return PassResult(gm, modified, stats)


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    path = name.split(" (")[0]
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _layer_numbers(
    gm: torch.fx.GraphModule, site: Site, nonzero: bool = False
) -> tuple[tuple[int, ...], int, int, int]:
    """(weight shape as [out, in, ...], weights (nonzero ones if asked), FLOPs, weight bytes)."""
    w = get_attr_value(gm, site.weight)
    params = int(torch.count_nonzero(w)) if nonzero else w.numel()
    with unset_fake_temporarily():
        flops = node_flops(site.node)
    shape = tuple(w.shape) if site.kind == "conv2d" else tuple(w.shape[::-1])  # [out, in]
    return shape, params, flops, w.numel() * w.element_size()


# ---------------------------------------------------------------------------------- channels


def _prune_channels(gm: torch.fx.GraphModule, cfg: Config) -> tuple[PruneSummary, dict]:
    summary = PruneSummary("channels", cfg.sparsity)
    analysis = ChannelAnalysis(gm)
    importance = _importance_fn(cfg.prune_importance)
    keep: dict[int, torch.Tensor] = {}
    removed = 0
    for group in analysis.groups:
        reason = group.fixed
        if reason is None and any(_excluded(n, cfg.prune_exclude) for n in group.names):
            reason = "excluded by prune_exclude"
        if reason is not None:
            summary.groups_fixed.setdefault(reason, []).extend(group.names)
            continue
        n_keep = _channels_to_keep(group.channels, cfg.sparsity, cfg.prune_round_to)
        if n_keep == group.channels:
            summary.groups_fixed.setdefault("nothing to remove at this sparsity", []).extend(
                group.names
            )
            continue
        scores = importance(_group_weights(gm, group))
        if scores.shape != (group.channels,):
            raise ValueError(
                f"prune_importance returned shape {tuple(scores.shape)} for a group of "
                f"{group.channels} channels ({', '.join(group.names)}); expected "
                f"({group.channels},)"
            )
        keep[group.root] = torch.topk(scores, n_keep).indices.sort().values
        removed += group.channels - n_keep
        summary.groups_pruned += 1
    if not keep:
        return summary, {"channels_removed": 0, "groups_pruned": 0, "params_removed": 0}
    params_before = count_params(gm)
    _apply(gm, analysis, keep)
    params_after = count_params(gm)
    stats = {
        "channels_removed": removed,
        "groups_pruned": len(keep),
        "params_removed": params_before - params_after,
    }
    return summary, stats


def _channels_to_keep(channels: int, sparsity: float, round_to: int) -> int:
    """Channels left after removing `sparsity` of them, rounded up to a multiple of round_to."""
    keep = max(1, channels - math.floor(channels * sparsity))
    return min(channels, math.ceil(keep / round_to) * round_to)


def _group_weights(gm: torch.fx.GraphModule, group: ChannelGroup) -> list[torch.Tensor]:
    """The weights that make the group's channels, one [channels, -1] matrix per layer: each
    producer's output slices and each depthwise conv's filters."""
    out = []
    for site, _label in group.producers:
        w = get_attr_value(gm, site.weight).detach()
        w = w if site.kind == "conv2d" else w.t()  # linear weights are stored [in, out]
        out.append(w.reshape(w.shape[0], -1).float())
    for node in group.depthwise:
        w = get_attr_value(gm, node.args[1]).detach()
        out.append(w.reshape(w.shape[0], -1).float())
    return out


def _importance_fn(spec: str | Importance) -> Importance:
    if callable(spec):
        return spec
    p = {"l1": 1, "l2": 2}[spec]

    def magnitude(weights: list[torch.Tensor]) -> torch.Tensor:
        """Sum over the group's layers of each channel's L_p norm, each layer's norms divided
        by their mean (so no layer dominates by its fan-in)."""
        total = 0
        for w in weights:
            norms = w.norm(p=p, dim=1)
            total = total + norms / norms.mean().clamp_min(1e-12)
        return total

    return magnitude


def _apply(gm: torch.fx.GraphModule, analysis: ChannelAnalysis, keep: dict) -> None:
    """Cut every constant and view size the kept channels reach, then refresh meta["val"]."""

    def kept(label: int) -> torch.Tensor | None:
        return keep.get(analysis.find(label))

    def count(label: int) -> int:
        chosen = kept(label)
        return analysis.channels[label] if chosen is None else len(chosen)

    changed: set[torch.fx.Node] = set()
    by_argument: dict[tuple[torch.fx.Node, int], list] = {}
    for cut in analysis.cuts:
        positions = cut.tag.positions(kept)
        if positions is not None:
            by_argument.setdefault((cut.node, cut.index), []).append((cut.dim, positions))
    for (node, index), cuts in by_argument.items():
        const = node.args[index]
        value = get_attr_value(gm, const)
        for dim, positions in cuts:
            value = _select(value, dim, positions)
        args = list(node.args)
        args[index] = insert_constant(gm, value, const.target, before=node)
        node.args = tuple(args)
        changed.add(node)
    for resize in analysis.resizes:
        sizes = list(resize.node.args[1])
        new = resize.tag.size(count)
        if new != sizes[resize.dim]:
            sizes[resize.dim] = new
            resize.node.args = (resize.node.args[0], sizes, *resize.node.args[2:])
            changed.add(resize.node)
    for node, tag in analysis.depthwise:
        groups = tag.size(count)
        if groups != node.args[8]:
            node.args = (*node.args[:8], groups)
            changed.add(node)
    _refresh_meta(gm, changed)


def _select(value: torch.Tensor, dim: int, positions: torch.Tensor) -> torch.Tensor:
    """value.index_select(dim, positions), keeping the order of its strides (a linear weight
    stored [in, out] as the transpose of a contiguous [out, in] stays that way)."""
    order = sorted(range(value.dim()), key=lambda d: -value.stride(d))
    picked = value.permute(order).index_select(order.index(dim), positions).contiguous()
    return picked.permute([order.index(d) for d in range(value.dim())])


def _refresh_meta(gm: torch.fx.GraphModule, changed: set[torch.fx.Node]) -> None:
    """Recompute meta["val"] of the changed nodes and everything downstream of them."""
    mode = fake_mode_of(gm)
    stale = set(changed)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node not in stale and not any(i in stale for i in node.all_input_nodes):
            continue
        stale.add(node)
        node.meta["val"] = fake_value(node, mode)


# ---------------------------------------------------------------------------------- weights


def _prune_weights(
    gm: torch.fx.GraphModule, cfg: Config, sites: list[Site]
) -> tuple[PruneSummary, dict]:
    """Zero single weights: per layer, globally, or N:M; each layer gets a new constant."""
    if cfg.prune_pattern is not None:
        method = cfg.prune_pattern
    else:
        method = f"magnitude ({cfg.prune_scope})"
    summary = PruneSummary(method, cfg.sparsity, note=STORAGE_ONLY)
    weights = {s.node: get_attr_value(gm, s.weight).detach() for s in sites}
    masks: dict[torch.fx.Node, torch.Tensor] = {}
    if cfg.prune_pattern is not None:
        n, m = (int(v) for v in cfg.prune_pattern.split(":"))
        for site in sites:
            mask = _n_of_m_mask(weights[site.node], _input_dim(site), n, m)
            if mask is None:
                reason = f"input channels not a multiple of {m}"
                summary.groups_fixed.setdefault(reason, []).append(site.name)
            else:
                masks[site.node] = mask
    elif cfg.prune_scope == "global" and weights:
        flat = torch.cat([w.abs().reshape(-1) for w in weights.values()])
        k = math.floor(cfg.sparsity * flat.numel())
        drop = torch.zeros(flat.numel(), dtype=torch.bool)
        if k:
            drop[torch.topk(flat, k, largest=False).indices] = True
        offset = 0
        for node, w in weights.items():
            masks[node] = ~drop[offset : offset + w.numel()].reshape(w.shape)
            offset += w.numel()
    else:
        for node, w in weights.items():
            k = math.floor(cfg.sparsity * w.numel())
            drop = torch.zeros(w.numel(), dtype=torch.bool)
            if k:
                drop[torch.topk(w.abs().reshape(-1), k, largest=False).indices] = True
            masks[node] = ~drop.reshape(w.shape)
    zeroed = 0
    for site in sites:
        mask = masks.get(site.node)
        if mask is None or bool(mask.all()):
            continue
        w = weights[site.node]
        zeroed += int((~mask).sum())
        args = list(site.node.args)
        args[site.weight_index] = insert_constant(
            gm, w * mask, site.weight.target, before=site.node
        )
        site.node.args = tuple(args)
    layers = sum(1 for s in sites if s.node in masks and not bool(masks[s.node].all()))
    return summary, {"weights_zeroed": zeroed, "layers_pruned": layers}


def _input_dim(site: Site) -> int:
    """The weight's reduction dim: conv [out, in, kh, kw] -> 1; linear stored [in, out] -> 0."""
    return 1 if site.kind == "conv2d" else 0


def _n_of_m_mask(w: torch.Tensor, dim: int, n: int, m: int) -> torch.Tensor | None:
    """Keep the n largest |w| of every m consecutive weights along `dim`; None if that dim is
    not a multiple of m."""
    if w.shape[dim] % m:
        return None
    moved = w.abs().movedim(dim, -1)
    groups = moved.reshape(-1, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    return mask.reshape(moved.shape).movedim(-1, dim)
