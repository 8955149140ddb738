"""Small models the end-to-end tests and examples share (random weights, no downloads)."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.models import TINY_BERT, BasicBlock  # written once, shared with benchmarks


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 10, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, d_out),
        )

    def forward(self, x):
        return self.net(x)


class ResidualCNN(nn.Module):
    """A small ResNet: stem with BN, two residual stages, max pool, global pool, classifier."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DepthwiseSeparable(nn.Module):
    """MobileNet block: depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN, inverted residual."""

    def __init__(self, c: int = 16, expand: int = 4):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int = 32, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=64, dropout=dropout, batch_first=True
        )

    def forward(self, x):
        return self.layer(x)


class SpectralHead(nn.Module):
    """Uses torch.fft.rfft, which TVM has no rule for: that node must fall back to PyTorch."""

    def __init__(self, n: int = 16):
        super().__init__()
        self.proj = nn.Linear(n, n)
        self.out = nn.Linear(n // 2 + 1, 4)

    def forward(self, x):
        spectrum = torch.fft.rfft(torch.relu(self.proj(x))).abs()
        return self.out(spectrum)


class DataDependentBranch(nn.Module):
    """`.item()` in an `if`: dynamo breaks the graph there; both halves must still be right."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x)
        if y.sum().item() > 0:
            return self.b(y).relu()
        return self.b(-y).sigmoid()


def tiny_bert():
    """A 2-layer BERT from a transformers config (random init, nothing downloaded)."""
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(**TINY_BERT)).eval()


class Fn(nn.Module):
    """forward(*xs) = fn(self, *xs); keyword tensors become buffers (frozen into constants)."""

    def __init__(self, fn, **buffers: torch.Tensor):
        super().__init__()
        self.fn = fn
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def forward(self, *xs):
        return self.fn(self, *xs)


class ViTBlock(nn.Module):
    """A pre-norm transformer block as timm's `vision_transformer.Block` writes it: one qkv
    linear, `F.scaled_dot_product_attention` (timm's fused attention), LayerScale, GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, init_values: float = 0.1):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Parameter(init_values * torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim)
        )
        self.ls2 = nn.Parameter(init_values * torch.ones(dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * self.attention(self.norm1(x))
        return x + self.ls2 * self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A Vision Transformer in timm's layout (timm itself needs torchvision, which does not
    import beside torch 2.13): conv patch embedding, class token, learned position embedding,
    `ViTBlock`s, final norm, class-token head."""

    def __init__(
        self, image: int = 16, patch: int = 4, dim: int = 32, depth: int = 2, heads: int = 4,
        classes: int = 10,
    ):  # fmt: skip
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny_llama(**overrides):
    """A 2-layer Llama (grouped-query attention, RoPE, RMSNorm, SwiGLU) from a transformers
    config: random init, nothing downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))


# Decoder architectures from transformers configs, tiny: 2 layers, hidden 64 (random weights).
_DECODER_COMMON = dict(
    vocab_size=128, num_hidden_layers=2, max_position_embeddings=256, pad_token_id=0
)
DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(TINY_LLAMA)),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4),
    ),
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    ),
}


def tiny_decoder(arch: str, **overrides):
    """A 2-layer decoder LM of architecture `arch` (a key of DECODERS) from its transformers
    config: random init, nothing downloaded, eval mode, no dropout."""
    import transformers

    config_name, model_name, sizes = DECODERS[arch]
    config = getattr(transformers, config_name)(**{**_DECODER_COMMON, **sizes, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()
