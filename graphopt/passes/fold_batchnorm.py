"""fold_batchnorm: rewrite inference BatchNorm after conv/linear into arithmetic on the weights."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from graphopt.config import Config
from graphopt.passes.base import Emitter, PassResult, fake_mode_of, is_pure

aten = torch.ops.aten


def _bn_args(node: torch.fx.Node) -> tuple[Any, ...] | None:
    """(x, gamma, beta, mean, var, eps) of an inference batch norm node, else None."""
    if node.target is aten._native_batch_norm_legit_no_training.default:
        x, gamma, beta, mean, var, _momentum, eps = node.args
    elif node.target is aten.native_batch_norm.default and node.args[5] is False:
        x, gamma, beta, mean, var, _training, _momentum, eps = node.args
    else:
        return None
    return x, gamma, beta, mean, var, eps


class _Constness:
    """Whether a node depends on get_attr constants only (through pure ops), memoized."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.memo: dict[torch.fx.Node, bool] = {}
        for node in graph.nodes:  # topological order: no recursion for the original nodes
            self(node)

    def __call__(self, node: Any) -> bool:
        if node is None:
            return True
        if not isinstance(node, torch.fx.Node):
            return False
        if node not in self.memo:
            self.memo[node] = node.op == "get_attr" or (
                is_pure(node) and all(self(i) for i in node.all_input_nodes)
            )
        return self.memo[node]


def _scale_and_shift(emit: Emitter, gamma, beta, mean, var, eps) -> tuple[torch.fx.Node, ...]:
    """scale = gamma / sqrt(var + eps); shift = beta - mean * scale (as graph nodes)."""
    scale = emit(aten.rsqrt.default, emit(aten.add.Tensor, var, eps))
    if gamma is not None:
        scale = emit(aten.mul.Tensor, scale, gamma)
    shift = emit(aten.neg.default, emit(aten.mul.Tensor, mean, scale))
    if beta is not None:
        shift = emit(aten.add.Tensor, shift, beta)
    return scale, shift


def _cast(emit: Emitter, node: torch.fx.Node, like: torch.fx.Node) -> torch.fx.Node:
    dtype = like.meta["val"].dtype
    if node.meta["val"].dtype == dtype:
        return node
    return emit(aten._to_copy.default, node, dtype=dtype)


def _new_bias(emit: Emitter, bias, scale, shift, like: torch.fx.Node) -> torch.fx.Node:
    """bias * scale + shift (just shift without a bias), in the weight's dtype."""
    if bias is None:
        return _cast(emit, shift, like)
    return _cast(emit, emit(aten.add.Tensor, emit(aten.mul.Tensor, bias, scale), shift), like)


def _fold_into_conv(emit: Emitter, conv: torch.fx.Node, bn_args, getitem: torch.fx.Node) -> bool:
    """convolution(x, W, b) -> convolution(x, W * scale[c], b * scale + shift)."""
    _x, weight, bias, _stride, _pad, _dil, transposed, _out_pad, groups = conv.args
    w = weight.meta["val"]
    channels = w.shape[1] * groups if transposed else w.shape[0]
    if bn_args[3].meta["val"].shape != (channels,):
        return False
    scale, shift = _scale_and_shift(emit, *bn_args[1:])
    if transposed:  # weight is [C_in, C_out / groups, *k]; output channel g*C_out/groups + j
        grouped = [groups, w.shape[0] // groups, w.shape[1], *w.shape[2:]]
        factor = emit(aten.view.default, scale, [groups, 1, w.shape[1]] + [1] * (w.dim() - 2))
        new_w = emit(aten.mul.Tensor, emit(aten.reshape.default, weight, grouped), factor)
        new_w = emit(aten.reshape.default, new_w, list(w.shape))
    else:  # weight is [C_out, C_in / groups, *k]
        factor = emit(aten.view.default, scale, [channels] + [1] * (w.dim() - 1))
        new_w = emit(aten.mul.Tensor, weight, factor)
    args = list(conv.args)
    args[1] = _cast(emit, new_w, weight)
    args[2] = _new_bias(emit, bias, scale, shift, weight)
    conv.args = tuple(args)
    getitem.replace_all_uses_with(conv)
    return True


def _fold_into_linear(emit: Emitter, mm: torch.fx.Node, bn_args, getitem: torch.fx.Node) -> bool:
    """addmm(b, x, Wt) / mm(x, Wt) -> addmm(b * scale + shift, x, Wt * scale); Wt is [in, out]."""
    if mm.target is aten.addmm.default:
        bias, x, weight_t = mm.args
        if mm.kwargs.get("beta", 1) != 1 or mm.kwargs.get("alpha", 1) != 1:
            return False
    else:
        bias, (x, weight_t) = None, mm.args
    out = mm.meta["val"]
    if out.dim() != 2 or bn_args[3].meta["val"].shape != (weight_t.meta["val"].shape[1],):
        return False
    scale, shift = _scale_and_shift(emit, *bn_args[1:])
    new_w = _cast(emit, emit(aten.mul.Tensor, weight_t, scale), weight_t)
    new_b = _new_bias(emit, bias, scale, shift, weight_t)
    addmm = emit(aten.addmm.default, new_b, x, new_w)
    getitem.replace_all_uses_with(addmm)
    return True


_PRODUCERS = {
    aten.convolution.default: ("folded_into_conv", _fold_into_conv),
    aten.addmm.default: ("folded_into_linear", _fold_into_linear),
    aten.mm.default: ("folded_into_linear", _fold_into_linear),
}


def fold_batchnorm(gm: torch.fx.GraphModule, cfg: Config) -> PassResult:
    """Rewrite inference BatchNorm that follows a conv or linear into arithmetic on its weights.

    The new nodes read only constants, so `fold_constants` (next in the pipeline) turns them
    into the folded weights; this pass does no arithmetic itself. Matches
    `_native_batch_norm_legit_no_training` (or `native_batch_norm` with training=False) whose
    input is `aten.convolution` (any groups, 1-3 spatial dims, transposed too) or a 2-D
    `aten.addmm`/`aten.mm` (nn.Linear + BatchNorm1d), when the conv/linear has no other user,
    only getitem 0 of the BN is used, and the weights, bias and BN parameters and statistics
    are constants (get_attr, or pure ops on them). Skips training graphs (weights are inputs)
    and linears on 3-D inputs (behind view: BatchNorm1d then normalizes another dim).

    Before -> after:
        y = convolution(x, W, b, ...); bn = _native_batch_norm_legit_no_training(y, g, be, m, v,
        0.1, eps); out = bn[0]
        -> s = rsqrt(v + eps) * g; out = convolution(x, W * s.view(-1, 1, 1, 1),
           b * s + (be - m * s), ...)

    Args:
        gm: a frozen core-ATen graph with meta["val"]; changed in place.
        cfg: unused.

    Returns:
        PassResult with stats {"folded_into_conv": n, "folded_into_linear": m}.
    """
    graph = gm.graph
    mode = fake_mode_of(gm)
    if mode is None:  # needs meta["val"] to check shapes and to give new nodes theirs
        return PassResult(gm, False, {"folded_into_conv": 0, "folded_into_linear": 0})
    const = _Constness(graph)
    stats = {"folded_into_conv": 0, "folded_into_linear": 0}
    for bn in list(graph.nodes):
        bn_args = _bn_args(bn) if bn.op == "call_function" else None
        if bn_args is None or not isinstance(bn_args[0], torch.fx.Node):
            continue
        producer = bn_args[0]
        kind = _PRODUCERS.get(producer.target) if producer.op == "call_function" else None
        getitems = [u for u in bn.users if u.target is operator.getitem and u.args[1] == 0]
        if (
            kind is None
            or len(producer.users) != 1
            or len(getitems) != 1
            or any(u not in getitems and u.users for u in bn.users)
            or not all(isinstance(a, torch.fx.Node) for a in bn_args[3:5])
            or not all(const(a) for a in bn_args[1:5])
            or not isinstance(bn_args[5], float | int)
        ):
            continue
        weight_and_bias = _weight_and_bias(producer)
        if not all(const(a) for a in weight_and_bias) or not all(
            isinstance(n.meta.get("val"), torch.Tensor)
            for n in (producer, bn_args[3], *weight_and_bias, *bn_args[1:5])
            if n is not None
        ):
            continue
        stat, fold = kind
        if fold(Emitter(gm, producer, mode), producer, bn_args, getitems[0]):
            stats[stat] += 1
            for user in list(bn.users):
                graph.erase_node(user)
            graph.erase_node(bn)
            if not producer.users:  # a linear was replaced by a new addmm
                graph.erase_node(producer)
    modified = any(stats.values())
    if modified:
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified, stats)


def _weight_and_bias(producer: torch.fx.Node) -> tuple[Any, ...]:
    if producer.target is aten.convolution.default:
        return producer.args[1], producer.args[2]
    if producer.target is aten.addmm.default:
        return producer.args[0], producer.args[2]
    return (producer.args[1],)
