"""unbatch_shared_matmuls: a batched matmul by one constant weight becomes a plain matmul.

`nn.Linear` on a 3-d input that is not contiguous (an attention output after its transpose,
as in every Hugging Face decoder's output projection at batch > 1) decomposes into `bmm` with
the weight expanded along the batch. As a `mm` on the flattened rows it is the same numbers,
one weight read instead of a view per batch entry, and a linear layer that quantization and
pruning recognize (they look for `mm`/`addmm` by a constant).

    bmm(x [B, M, K], expand(W^T [K, N], [B, K, N]))  =>  view(mm(view(x, [B*M, K]), W^T), [B, M, N])
"""

from __future__ import annotations

import torch
import torch.fx

from graphopt.config import Config
from graphopt.passes.base import Emitter, PassResult, fake_mode_of

aten = torch.ops.aten


def unbatch_shared_matmuls(gm: torch.fx.GraphModule, cfg: Config) -> PassResult:
    """Rewrite every `bmm` whose second operand is a 2-d constant expanded along the batch."""
    mode = fake_mode_of(gm)
    count = 0
    for node in list(gm.graph.nodes):
        weight = _shared_weight(node)
        if weight is None:
            continue
        x = node.args[0]
        emit = Emitter(gm, node, mode)
        # The batch and row counts as the graph knows them (sym_size nodes where symbolic).
        batch, rows = (
            emit(aten.sym_size.int, x, d) if isinstance(n, torch.SymInt) else n
            for d, n in enumerate(x.meta["val"].shape[:2])
        )
        if not x.meta["val"].is_contiguous():
            x = emit(aten.clone.default, x, memory_format=torch.contiguous_format)
        flat = emit(aten.view.default, x, [-1, x.meta["val"].shape[2]])
        product = emit(aten.mm.default, flat, weight)
        out = emit(aten.view.default, product, [batch, rows, weight.meta["val"].shape[1]])
        for key in ("stack_trace", "nn_module_stack"):
            if key in node.meta:
                for new in (product, out):
                    new.meta[key] = node.meta[key]
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        count += 1
    if not count:
        return PassResult(gm, False, {})
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, True, {"unbatched": count})


def _shared_weight(node: torch.fx.Node) -> torch.fx.Node | None:
    """The 2-d constant a `bmm` multiplies every batch entry by, if it is such a bmm."""
    if node.op != "call_function" or node.target is not aten.bmm.default:
        return None
    x, expanded = node.args
    while _identity_view(expanded):  # remove_noops drops these; without it they are here
        expanded = expanded.args[0]
    if not isinstance(expanded, torch.fx.Node) or expanded.target is not aten.expand.default:
        return None
    weight = expanded.args[0]
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return None
    w, xv = weight.meta.get("val"), x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not isinstance(xv, torch.Tensor):
        return None
    return weight if xv.dim() == 3 else None


def _identity_view(node: object) -> bool:
    if not isinstance(node, torch.fx.Node) or node.target is not aten.view.default:
        return False
    source = node.args[0]
    before = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    after = node.meta.get("val")
    return (
        isinstance(before, torch.Tensor)
        and isinstance(after, torch.Tensor)
        and (before.shape == after.shape)
    )
