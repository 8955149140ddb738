import pytest
import torch

from graphopt.passes.decompose_fused_ops import decompose_fused_ops
from graphopt.testing import assert_same_outputs
from tests.passes.conftest import CFG, assert_noop, capture, ops

aten = torch.ops.aten


class FusedEncoderLayer(torch.nn.Module):
    """Calls the kernel nn.TransformerEncoderLayer's fast path uses under no_grad."""

    def __init__(self, layer: torch.nn.TransformerEncoderLayer, mask=None):
        super().__init__()
        self.layer, self.mask = layer, mask

    def forward(self, x):
        layer = self.layer
        attn = layer.self_attn
        return aten._transformer_encoder_layer_fwd(
            x,
            attn.embed_dim,
            attn.num_heads,
            attn.in_proj_weight,
            attn.in_proj_bias,
            attn.out_proj.weight,
            attn.out_proj.bias,
            layer.activation_relu_or_gelu == 2,
            layer.norm_first,
            layer.norm1.eps,
            layer.norm1.weight,
            layer.norm1.bias,
            layer.norm2.weight,
            layer.norm2.bias,
            layer.linear1.weight,
            layer.linear1.bias,
            layer.linear2.weight,
            layer.linear2.bias,
            self.mask,
            None if self.mask is None else 1,
        )


class FusedSelfAttention(torch.nn.Module):
    def __init__(self, mha: torch.nn.MultiheadAttention):
        super().__init__()
        self.mha = mha

    def forward(self, x):
        m = self.mha
        out, _ = aten._native_multi_head_attention(
            x,
            x,
            x,
            m.embed_dim,
            m.num_heads,
            m.in_proj_weight,
            m.in_proj_bias,
            m.out_proj.weight,
            m.out_proj.bias,
            None,
            False,
        )
        return out


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_fast_path_is_decomposed(norm_first, activation):
    layer = torch.nn.TransformerEncoderLayer(
        32, 4, 64, batch_first=True, norm_first=norm_first, activation=activation
    ).eval()
    x = torch.randn(2, 6, 32)
    gm, _ = capture(FusedEncoderLayer(layer), x)
    assert aten._transformer_encoder_layer_fwd.default in ops(gm)
    result = decompose_fused_ops(gm, CFG)
    assert result.modified and result.stats == {"decomposed": 1, "kept_fused": 0}
    after = ops(result.gm)
    assert aten._transformer_encoder_layer_fwd.default not in after
    assert after[aten.native_layer_norm.default] == 2 and after[aten._softmax.default] == 1
    with torch.no_grad():  # eager under no_grad is the fused kernel itself
        assert_same_outputs(layer(x), result.gm(x))


def test_multi_head_attention_fast_path_is_decomposed():
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    gm, _ = capture(FusedSelfAttention(mha), x)
    assert aten._native_multi_head_attention.default in ops(gm)
    result = decompose_fused_ops(gm, CFG)
    assert result.stats["decomposed"] == 1
    assert aten._native_multi_head_attention.default not in ops(result.gm)
    with torch.no_grad():
        assert_same_outputs(mha(x, x, x, need_weights=False)[0], result.gm(x))


def test_masked_encoder_layer_stays_fused():
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    mask = torch.zeros(2, 6, dtype=torch.bool)
    gm, _ = capture(FusedEncoderLayer(layer, mask), torch.randn(2, 6, 32))
    result = decompose_fused_ops(gm, CFG)
    assert result.stats == {"decomposed": 0, "kept_fused": 1}
    assert aten._transformer_encoder_layer_fwd.default in ops(result.gm)


def test_torch_compile_no_grad_graph_is_decomposed():
    """The real source of these kernels: torch.compile of nn layers under no_grad."""
    import graphopt

    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        assert_same_outputs(layer(x), torch.compile(layer, backend="graphopt")(x))
    (report,) = graphopt.reports()
    step = next(p for p in report.passes if p.name == "decompose_fused_ops")
    assert step.stats["decomposed"] == 1


def test_graph_without_fused_ops_is_unchanged():
    gm, _ = capture(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), torch.randn(2, 8))
    assert_noop(decompose_fused_ops, gm)
