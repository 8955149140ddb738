"""Channel groups: which layers' channels must be removed together, and what removing them cuts.

Structured pruning removes an output channel of a conv or linear layer together with every
place that channel reaches: the layer's bias, the input channel of each layer that reads it,
depthwise convolutions it passes through, the other producers a residual add ties it to,
its slice of a concat, its block of positions after a flatten, and per-channel constants.
This module finds those couplings on the frozen ATen graph (the analysis Torch-Pruning's
DepGraph does on eager modules): one walk in topological order gives every dim of every
tensor a tag saying which layer's channels lie along it; ties (adds, multiplies) merge labels
in a union-find; anything the analysis does not understand - an op without a rule, the model's
output, an input of fixed size - marks the labels it touches as fixed, so pruning can never
change the model's output shapes or read a channel that no longer exists.

The result is a list of `ChannelGroup`s and the `Cut`s (constant, dim, tag) that a choice of
kept channels turns into smaller tensors; `graphopt.passes.prune` chooses and applies them.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from graphopt.ops import RESHAPES
from graphopt.passes.base import Site, find_sites
from graphopt.shapes import concrete

aten = torch.ops.aten

# Ops that keep dims 0 and 1 (batch, channels) and work within each channel.
_PER_CHANNEL = {
    aten.max_pool2d_with_indices.default,
    aten.max_pool2d.default,
    aten.avg_pool2d.default,
    aten._adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool2d.default,
    aten.upsample_nearest2d.vec,
    aten.upsample_nearest2d.default,
    aten.upsample_bilinear2d.vec,
    aten.upsample_bilinear2d.default,
}
_SIZE_ARGS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
_SAME_SHAPE = {  # elementwise ops torch does not tag "pointwise"
    aten.clone.default,
    aten.alias.default,
    aten._to_copy.default,
    aten.detach.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
}


@dataclass(frozen=True)
class Segment:
    """`channels` channels of label `label` (None: channels no layer owns), each spanning
    `inner` consecutive positions."""

    label: int | None
    channels: int
    inner: int = 1


@dataclass(frozen=True)
class DimTag:
    """What lies along one dim of a tensor: segments side by side, the whole repeated `outer`
    times. A conv output's channel dim is one segment; after flatten([N, C, H, W]) the flat dim
    is one segment with inner=H*W; a channels-last flatten gives outer=H*W; a concat, several
    segments."""

    segments: tuple[Segment, ...]
    outer: int = 1

    def size(self, kept: Callable[[int], int] | None = None) -> int:
        """Positions along the dim (with `kept(label)` channels per label, if given)."""
        block = 0
        for seg in self.segments:
            channels = seg.channels if kept is None or seg.label is None else kept(seg.label)
            block += channels * seg.inner
        return self.outer * block

    def positions(self, keep: Callable[[int], torch.Tensor | None]) -> torch.Tensor | None:
        """Indices of the positions that stay when label L keeps channels `keep(L)` (None: all);
        None when nothing along this dim is cut."""
        pieces, offset, cut = [], 0, False
        for seg in self.segments:
            chosen = None if seg.label is None else keep(seg.label)
            channels = torch.arange(seg.channels) if chosen is None else chosen
            cut |= chosen is not None
            spans = channels[:, None] * seg.inner + torch.arange(seg.inner)[None, :]
            pieces.append(offset + spans.reshape(-1))
            offset += seg.channels * seg.inner
        if not cut:
            return None
        block = torch.cat(pieces)
        return (torch.arange(self.outer)[:, None] * offset + block[None, :]).reshape(-1)

    def labels(self) -> list[int]:
        return [seg.label for seg in self.segments if seg.label is not None]

    def same_layout(self, other: DimTag) -> bool:
        return self.outer == other.outer and [(s.channels, s.inner) for s in self.segments] == [
            (s.channels, s.inner) for s in other.segments
        ]


Tags = list[DimTag | None]  # one entry per dim of a tensor


@dataclass
class Cut:
    """Argument `index` of `node` is a constant whose dim `dim` is laid out as `tag`: cut it."""

    node: torch.fx.Node
    index: int
    dim: int
    tag: DimTag


@dataclass
class Resize:
    """A view/reshape whose size argument `dim` is laid out as `tag`: shrink it."""

    node: torch.fx.Node
    dim: int
    tag: DimTag


@dataclass
class ChannelGroup:
    """Channels of one or more layers that must be kept or removed together.

    Attributes:
        root: the union-find label the cuts' tags refer to (via `ChannelAnalysis.find`).
        channels: how many channels the group has.
        producers: the layers whose output channels these are (with the label of each).
        depthwise: depthwise convolutions the channels pass through (their groups shrink).
        fixed: why the group cannot be pruned (None: it can).
    """

    root: int
    channels: int
    producers: list[tuple[Site, int]] = field(default_factory=list)
    depthwise: list[torch.fx.Node] = field(default_factory=list)
    fixed: str | None = None

    @property
    def names(self) -> list[str]:
        return [site.name for site, _ in self.producers]


class ChannelAnalysis:
    """Tags for every tensor of `gm`, the couplings between labels, and the edits they imply.

    Attributes:
        groups: one `ChannelGroup` per coupled set of layer outputs, in graph order.
        cuts: every constant argument whose size follows some group's channels.
        resizes: every view/reshape size entry that does.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.parent: list[int] = []
        self.channels: list[int] = []
        self.fixed: dict[int, str] = {}
        self.tags: dict[torch.fx.Node, Any] = {}
        self.cuts: list[Cut] = []
        self.resizes: list[Resize] = []
        self.producers: list[tuple[Site, int]] = []
        self.depthwise: list[tuple[torch.fx.Node, DimTag]] = []
        self.sites = {site.node: site for site in find_sites(gm)}
        for node in gm.graph.nodes:
            self._visit(node)
        self.groups = self._groups()

    # ------------------------------------------------------------------ union-find over labels

    def _new_label(self, channels: int) -> int:
        self.parent.append(len(self.parent))
        self.channels.append(channels)
        return len(self.parent) - 1

    def find(self, label: int) -> int:
        while self.parent[label] != label:
            self.parent[label] = self.parent[self.parent[label]]
            label = self.parent[label]
        return label

    def _union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.channels[a] != self.channels[b]:
            self._fix_labels([a, b], "ties layers with different channel counts")
        self.parent[b] = a
        if b in self.fixed:
            self.fixed.setdefault(a, self.fixed[b])

    def _fix_labels(self, labels: list[int], reason: str) -> None:
        for label in labels:
            self.fixed.setdefault(self.find(label), reason)

    def _fix(self, tags: Any, reason: str) -> None:
        """Mark every label in `tags` (a Tags list, or nested lists of them) as fixed."""
        if isinstance(tags, DimTag):
            self._fix_labels(tags.labels(), reason)
        elif isinstance(tags, list | tuple):
            for t in tags:
                self._fix(t, reason)

    # ------------------------------------------------------------------ the walk

    def _tags_of(self, value: Any) -> Tags:
        """Tags of a node's tensor value (all None for untagged tensors)."""
        tags = self.tags.get(value) if isinstance(value, torch.fx.Node) else None
        if tags is None:
            val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
            return [None] * (val.dim() if isinstance(val, torch.Tensor) else 0)
        return tags

    def _visit(self, node: torch.fx.Node) -> None:
        if node.op == "output":
            for arg in node.all_input_nodes:
                self._fix(self.tags.get(arg), "reaches the model output")
            return
        if node.op != "call_function":
            return
        target = node.target
        if node in self.sites:
            self._layer(node, self.sites[node])
        elif target is operator.getitem:
            source = self.tags.get(node.args[0])
            if isinstance(source, tuple):
                self.tags[node] = source[node.args[1]]
        elif target is aten.convolution.default:  # a conv the layer finder does not take
            self._unknown(node)
        elif target in _SAME_SHAPE or (
            isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
        ):
            self._pointwise(node)
        elif target in RESHAPES:
            self._reshape(node)
        elif target is aten.permute.default:
            tags = self._tags_of(node.args[0])
            self.tags[node] = [tags[d % len(tags)] for d in node.args[1]]
        elif target in _REDUCTIONS:
            self._reduction(node)
        elif target in _PER_CHANNEL:
            self._per_channel(node)
        elif target is aten.cat.default:
            self._cat(node)
        elif target is aten.sym_size.int:
            tags = self._tags_of(node.args[0])
            self._fix(tags[node.args[1]], "its size is read (sym_size)")
        else:
            self._unknown(node)

    def _unknown(self, node: torch.fx.Node) -> None:
        name = getattr(node.target, "__name__", str(node.target))
        for arg in node.all_input_nodes:
            self._fix(self.tags.get(arg), f"read by {name} ({node.name}): no channel rule")

    def _layer(self, node: torch.fx.Node, site: Site) -> None:
        """conv2d / linear with a constant weight: reads channels (a cut of the weight's input
        dim) and makes new ones (a new label), except depthwise convs, which pass them on."""
        in_tags = self._tags_of(site.act)
        weight = site.weight.meta["val"]
        channel_dim = 1  # of the activation: NCHW for conv, [N, features] for linear (2-D)
        for d, tag in enumerate(in_tags):
            if d != channel_dim:
                self._fix(tag, f"a non-channel dim of the input of {site.name}")
        tag_in = in_tags[channel_dim] if len(in_tags) > channel_dim else None
        bias_index = {aten.convolution.default: 2, aten.addmm.default: 0}.get(node.target)
        out_dims = node.meta["val"].dim()
        if site.kind == "conv2d":
            groups = node.args[8]
            out_channels, in_per_group = weight.shape[0], weight.shape[1]
            if groups != 1:
                if groups == out_channels and in_per_group == 1 and tag_in is not None:
                    # depthwise: channel c of the output reads channel c of the input only
                    self.depthwise.append((node, tag_in))
                    self.cuts.append(Cut(node, site.weight_index, 0, tag_in))
                    self._cut_bias(node, bias_index, tag_in)
                    self.tags[node] = [None, tag_in] + [None] * (out_dims - 2)
                else:
                    self._fix(tag_in, f"grouped convolution {site.name}")
                return
            w_in, w_out = 1, 0
        else:
            w_in, w_out, out_channels = 0, 1, weight.shape[1]
        if tag_in is not None:
            self.cuts.append(Cut(node, site.weight_index, w_in, tag_in))
        label = self._new_label(out_channels)
        tag_out = DimTag((Segment(label, out_channels),))
        self.producers.append((site, label))
        self.cuts.append(Cut(node, site.weight_index, w_out, tag_out))
        self._cut_bias(node, bias_index, tag_out)
        self.tags[node] = [None, tag_out] + [None] * (out_dims - 2)

    def _cut_bias(self, node: torch.fx.Node, index: int | None, tag: DimTag) -> None:
        bias = None if index is None else node.args[index]
        if bias is None:  # aten.mm, or a conv without bias
            return
        if isinstance(bias, torch.fx.Node) and bias.op == "get_attr":
            self.cuts.append(Cut(node, index, bias.meta["val"].dim() - 1, tag))
        else:
            self._fix(tag, f"the bias of {node.name} is computed, not a constant")

    def _pointwise(self, node: torch.fx.Node) -> None:
        """Elementwise ops broadcast their operands: the tags of aligned dims of equal size
        merge; a per-channel constant is cut with them; an operand of fixed size fixes them."""
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor):
            return self._unknown(node)
        operands = [
            (i, a)
            for i, a in enumerate(node.args)
            if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)
        ]
        if any(isinstance(a, torch.fx.Node) for a in node.kwargs.values()):
            return self._unknown(node)
        tags: Tags = []
        for d in range(out.dim()):
            size = concrete(out.shape[d])
            aligned = []
            for i, a in operands:
                val = a.meta["val"]
                k = d - (out.dim() - val.dim())
                if k >= 0 and concrete(val.shape[k]) == size and size != 1:
                    aligned.append((i, a, k))
            present = [self._tags_of(a)[k] for _, a, k in aligned]
            base = next((t for t in present if t is not None), None)
            tags.append(base)
            if base is None:
                continue
            for (i, a, k), tag in zip(aligned, present):
                if a.op == "get_attr":
                    self.cuts.append(Cut(node, i, k, base))
                elif tag is None:
                    self._fix(base, f"combined by {node.name} with {a.name}, of fixed size")
                elif not tag.same_layout(base):
                    self._fix([tag, base], f"combined by {node.name} in different layouts")
                else:
                    for x, y in zip(tag.segments, base.segments):
                        if x.label is None or y.label is None:
                            self._fix([tag, base], f"combined by {node.name} with fixed channels")
                        else:
                            self._union(x.label, y.label)
        self.tags[node] = tags

    def _reshape(self, node: torch.fx.Node) -> None:
        """view/reshape/flatten/(un)squeeze: a tagged dim may merge with untagged neighbours
        (its channels then span blocks); splitting it (e.g. into attention heads) fixes it."""
        src = node.args[0]
        in_shape = [concrete(s) for s in src.meta["val"].shape]
        out_shape = [concrete(s) for s in node.meta["val"].shape]
        in_tags = self._tags_of(src)
        if not any(in_tags):
            return
        out_tags: Tags = [None] * len(out_shape)
        for ins, outs in _dim_groups(in_shape, out_shape):
            tagged = [d for d in ins if in_tags[d] is not None]
            if not tagged:
                continue
            if len(tagged) > 1 or len(outs) != 1:
                self._fix([in_tags[d] for d in tagged], f"split or merged by {node.name}")
                continue
            d, (o,) = tagged[0], outs
            tag = in_tags[d]
            before = math.prod(in_shape[i] for i in ins if i < d)
            after = math.prod(in_shape[i] for i in ins if i > d)
            out_tags[o] = DimTag(
                tuple(Segment(s.label, s.channels, s.inner * after) for s in tag.segments),
                tag.outer * before,
            )
            if node.target in _SIZE_ARGS:
                sizes = node.args[1]
                if not isinstance(sizes[o], int):
                    self._fix(tag, f"{node.name} has a computed size there")
                    out_tags[o] = None
                elif sizes[o] != -1:
                    self.resizes.append(Resize(node, o, out_tags[o]))
        self.tags[node] = out_tags

    def _reduction(self, node: torch.fx.Node) -> None:
        in_tags = self._tags_of(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        n = len(in_tags)
        reduced = set(range(n)) if not dims else {d % n for d in dims}
        out: Tags = []
        for d, tag in enumerate(in_tags):
            if d in reduced:
                self._fix(tag, f"reduced over by {node.name}")
                if keepdim:
                    out.append(None)
            else:
                out.append(tag)
        self.tags[node] = out

    def _per_channel(self, node: torch.fx.Node) -> None:
        in_tags = self._tags_of(node.args[0])
        for tag in in_tags[2:]:
            self._fix(tag, f"a spatial dim of {node.name}")
        tags = in_tags[:2] + [None] * (len(in_tags) - 2)
        val = node.meta["val"]
        self.tags[node] = tuple(tags for _ in val) if isinstance(val, tuple | list) else tags

    def _cat(self, node: torch.fx.Node) -> None:
        inputs = node.args[0]
        out = node.meta["val"]
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % out.dim()
        all_tags = [self._tags_of(a) for a in inputs]
        for tags in all_tags:
            for d, tag in enumerate(tags):
                if d != dim:
                    self._fix(tag, f"a dim {node.name} does not concatenate along")
        pieces = [tags[dim] if len(tags) > dim else None for tags in all_tags]
        if all(p is None for p in pieces):
            return
        if any(p is not None and p.outer != 1 for p in pieces):
            self._fix(pieces, f"concatenated by {node.name} after a channels-last flatten")
            return
        segments = []
        for a, piece in zip(inputs, pieces):
            if piece is None:
                segments.append(Segment(None, concrete(a.meta["val"].shape[dim])))
            else:
                segments.extend(piece.segments)
        tags = [None] * out.dim()
        tags[dim] = DimTag(tuple(segments))
        self.tags[node] = tags

    # ------------------------------------------------------------------ the result

    def _groups(self) -> list[ChannelGroup]:
        groups: dict[int, ChannelGroup] = {}
        for site, label in self.producers:
            root = self.find(label)
            group = groups.setdefault(root, ChannelGroup(root, self.channels[root]))
            group.producers.append((site, label))
        for node, tag in self.depthwise:
            for label in tag.labels():
                if self.find(label) in groups:
                    groups[self.find(label)].depthwise.append(node)
        for root, group in groups.items():
            group.fixed = self.fixed.get(root)
            if group.fixed is None and group.channels < 2:
                group.fixed = "a single channel"
        return list(groups.values())


def _dim_groups(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]]:
    """Match the dims of two shapes with equal element counts into (dims of a, dims of b) whose
    sizes multiply to the same number; size-1 dims belong to no group."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        while i < len(a) and a[i] == 1:
            i += 1
        while j < len(b) and b[j] == 1:
            j += 1
        if i >= len(a) or j >= len(b):
            break
        ins, outs, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ins.append(i)
                pa *= a[i]
                i += 1
            else:
                outs.append(j)
                pb *= b[j]
                j += 1
        groups.append((ins, outs))
    return groups
