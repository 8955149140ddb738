"""decompose_fused_ops: expand PyTorch's fused fast-path kernels into core ATen ops.

Under `torch.no_grad()`, `nn.TransformerEncoderLayer` and `nn.MultiheadAttention` dispatch to
fused kernels (`aten._transformer_encoder_layer_fwd`, `aten._native_multi_head_attention`)
that no decomposition table expands. They hide their matmuls from every pass and no lowering
target but PyTorch can run them. This pass re-traces each one from a reference written with
ordinary ops (`make_fx` with the core-ATen decompositions, as inductor's pattern matcher
does for its replacements) and splices the result into the graph.

    _transformer_encoder_layer_fwd(x, ...)  =>  addmm, view, bmm, _softmax, ..., native_layer_norm
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt.config import Config
from graphopt.passes.base import PassResult, add_constant, fake_mode_of, named_args

aten = torch.ops.aten


def _attention(x_q, x_k, x_v, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias):
    """Multi-head attention of batch-first inputs, the math of nn.MultiheadAttention."""
    batch, length, _ = x_q.shape
    head_dim = embed_dim // num_heads
    w_q, w_k, w_v = qkv_weight.chunk(3)
    b_q, b_k, b_v = qkv_bias.chunk(3)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], num_heads, head_dim).transpose(1, 2)

    q = heads(F.linear(x_q, w_q, b_q))
    k = heads(F.linear(x_k, w_k, b_k))
    v = heads(F.linear(x_v, w_v, b_v))
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    out = out.transpose(1, 2).reshape(batch, length, embed_dim)
    return F.linear(out, proj_weight, proj_bias)


_ENCODER_TENSORS = (
    "src", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "norm_weight_1", "norm_bias_1",
    "norm_weight_2", "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2",
)  # fmt: skip
_ATTENTION_TENSORS = (
    "query", "key", "value", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
)  # fmt: skip


def _encoder_layer(node: torch.fx.Node) -> tuple[Callable[..., Any], list[Any]] | None:
    a = named_args(node)
    if a["mask"] is not None:
        return None  # masks (and nested-tensor padding) keep the fused kernel's semantics
    embed_dim, num_heads, eps = a["embed_dim"], a["num_heads"], a["eps"]
    act = F.gelu if a["use_gelu"] else F.relu

    def reference(*tensors):
        t = dict(zip(_ENCODER_TENSORS, tensors))
        weights = [t[k] for k in _ATTENTION_TENSORS[3:]]
        shape = (embed_dim,)

        def self_attention(x):
            return _attention(x, x, x, embed_dim, num_heads, *weights)

        def feed_forward(x):
            hidden = act(F.linear(x, t["ffn_weight_1"], t["ffn_bias_1"]))
            return F.linear(hidden, t["ffn_weight_2"], t["ffn_bias_2"])

        def norm(x, i):
            return F.layer_norm(x, shape, t[f"norm_weight_{i}"], t[f"norm_bias_{i}"], eps)

        src = t["src"]
        if a["norm_first"]:
            x = src + self_attention(norm(src, 1))
            return x + feed_forward(norm(x, 2))
        x = norm(src + self_attention(src), 1)
        return norm(x + feed_forward(x), 2)

    return reference, [a[k] for k in _ENCODER_TENSORS]


def _multi_head_attention(node: torch.fx.Node) -> tuple[Callable[..., Any], list[Any]] | None:
    a = named_args(node)
    if a["mask"] is not None or a["need_weights"]:
        return None
    embed_dim, num_heads = a["embed_dim"], a["num_head"]

    def reference(query, key, value, *weights):
        out = _attention(query, key, value, embed_dim, num_heads, *weights)
        return out, query.new_empty((0,))

    return reference, [a[k] for k in _ATTENTION_TENSORS]


# op -> builder of (reference function of the tensor args, tensor args), or None to keep it.
DECOMPOSITIONS: dict[Any, Callable[[torch.fx.Node], Any]] = {
    aten._transformer_encoder_layer_fwd.default: _encoder_layer,
    aten._native_multi_head_attention.default: _multi_head_attention,
}


def decompose_fused_ops(gm: torch.fx.GraphModule, cfg: Config) -> PassResult:
    """Replace fused fast-path kernels (see DECOMPOSITIONS) by their core-ATen expansion.

    Args:
        gm: a core-ATen graph with meta["val"] on every node.
        cfg: unused.

    Returns:
        PassResult with stats {"decomposed": n, "kept_fused": k} (k: cases the reference
        does not cover, e.g. attention masks, which stay fused and run in PyTorch).
    """
    from torch._decomp import core_aten_decompositions
    from torch._subclasses.fake_tensor import FakeTensorMode

    targets = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in DECOMPOSITIONS]
    if not targets:
        return PassResult(gm, False, {})
    fake_mode = fake_mode_of(gm) or FakeTensorMode(allow_non_fake_inputs=True)
    decomposed = kept = 0
    for node in targets:
        built = DECOMPOSITIONS[node.target](node)
        if built is None or not all(isinstance(t, torch.fx.Node) for t in built[1]):
            kept += 1
            continue
        reference, tensor_args = built
        with fake_mode:
            traced = make_fx(reference, core_aten_decompositions(), tracing_mode="real")(
                *[t.meta["val"] for t in tensor_args]
            )
        _splice(gm, node, traced, tensor_args)
        decomposed += 1
    if decomposed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, decomposed > 0, {"decomposed": decomposed, "kept_fused": kept})


def _splice(
    gm: torch.fx.GraphModule,
    node: torch.fx.Node,
    traced: torch.fx.GraphModule,
    args: list[torch.fx.Node],
) -> None:
    """Copy `traced`'s nodes before `node` (placeholders bound to `args`); replace `node`."""
    env: dict[torch.fx.Node, Any] = {}
    placeholders = iter(args)
    result: Any = None
    with gm.graph.inserting_before(node):
        for sub in traced.graph.nodes:
            if sub.op == "placeholder":
                env[sub] = next(placeholders)
            elif sub.op == "get_attr":  # tensor constants make_fx lifted (e.g. scalars)
                value = getattr(traced, sub.target)
                env[sub] = gm.graph.get_attr(add_constant(gm, value, f"{node.name}_{sub.target}"))
                env[sub].meta.update(sub.meta)
            elif sub.op == "output":
                result = torch.fx.map_arg(sub.args[0], lambda n: env[n])
            else:
                env[sub] = gm.graph.node_copy(sub, lambda n: env[n])
    if isinstance(result, tuple | list):
        for user in list(node.users):
            if user.target is operator.getitem:
                user.replace_all_uses_with(result[user.args[1]])
                gm.graph.erase_node(user)
    else:
        node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
