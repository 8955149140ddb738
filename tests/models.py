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
