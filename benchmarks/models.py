"""The models the suite times: hand-written CNNs and transformers configs (random weights)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

SEED = 0  # the weights
INPUT_SEED = 1  # the timed input
CALIBRATION_SEED = 100  # int8 calibration batch i is drawn with seed CALIBRATION_SEED + i
CALIBRATION_BATCHES = 4

Sampler = Callable[[torch.Generator], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class BenchModel:
    """A model to time: `make()` builds it in eval mode, `inputs()` gives batch-1 inputs and
    `calibration()` int8 calibration batches drawn the same way (`sample`) with other seeds."""

    name: str
    make: Callable[[], nn.Module]
    sample: Sampler

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.sample(torch.Generator().manual_seed(INPUT_SEED))

    def calibration(self, batches: int = CALIBRATION_BATCHES) -> list[tuple[torch.Tensor, ...]]:
        """The same batches for every int8 runner, none of them the timed input."""
        return [
            self.sample(torch.Generator().manual_seed(CALIBRATION_SEED + i)) for i in range(batches)
        ]


# ---------------------------------------------------------------- ResNet-18 (torchvision layout)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    def __init__(
        self, classes: int = 1000, width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2)
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, c_in = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, classes)
        _init_cnn(self)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


# ---------------------------------------------------------------- MobileNetV2 (torchvision layout)


def _conv_bn_relu6(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = [] if expand == 1 else [_conv_bn_relu6(c_in, hidden, 1)]
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expand ratio, channels, repeats, first stride), as in the paper and torchvision
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
    SETTINGS += ((6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, classes: int = 1000):
        super().__init__()
        layers, c_in = [_conv_bn_relu6(3, 32, 3, 2)], 32
        for expand, c_out, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expand))
                c_in = c_out
        layers.append(_conv_bn_relu6(c_in, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))
        _init_cnn(self)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _init_cnn(model: nn.Module) -> None:
    """torchvision's init, plus non-trivial BatchNorm statistics so folding them is tested."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.0)
            nn.init.uniform_(m.bias, -0.1, 0.1)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class SmallCNN(nn.Module):
    """The smoke-run CNN: a conv stem, one basic block, one inverted residual, a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn_relu6(3, 16, 3, 2)
        self.block = BasicBlock(16, 32, stride=2)
        self.mobile = InvertedResidual(32, 32, 1, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)
        _init_cnn(self)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.mobile(self.block(self.stem(x)))), 1))


# ---------------------------------------------------------------- transformers (random weights)


class TensorOutput(nn.Module):
    """Returns one tensor of a transformers model's output (`last_hidden_state`, `logits`)."""

    def __init__(self, model: nn.Module, field: str):
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, input_ids):
        return getattr(self.model(input_ids=input_ids), self.field)


def _bert(**sizes) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(**sizes)  # defaults are BERT-base: 12 layers, 768 wide, 12 heads
    return TensorOutput(BertModel(config, add_pooling_layer=False), "last_hidden_state")


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(use_cache=False)  # defaults are GPT-2 small: 12 layers, 768 wide
    return TensorOutput(GPT2LMHeadModel(config), "logits")


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(SEED)
        return make().eval()

    return build


def _image(size: int) -> Sampler:
    return lambda gen: (torch.randn(1, 3, size, size, generator=gen),)


def _tokens(vocab: int, length: int) -> Sampler:
    return lambda gen: (torch.randint(0, vocab, (1, length), generator=gen),)


TINY_BERT = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)

MODELS: dict[str, BenchModel] = {
    m.name: m
    for m in (
        BenchModel("resnet18", _seeded(ResNet18), _image(224)),
        BenchModel("mobilenet_v2", _seeded(MobileNetV2), _image(224)),
        BenchModel("bert-base", _seeded(_bert), _tokens(30522, 128)),
        BenchModel("gpt2", _seeded(_gpt2), _tokens(50257, 128)),
        BenchModel("tiny-cnn", _seeded(SmallCNN), _image(32)),
        BenchModel("tiny-bert", _seeded(lambda: _bert(**TINY_BERT)), _tokens(100, 16)),
    )
}
FULL = ("resnet18", "mobilenet_v2", "bert-base", "gpt2")
TINY = ("tiny-cnn", "tiny-bert")
