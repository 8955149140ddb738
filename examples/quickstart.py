"""Compile a small ResNet with graphopt, print what each pass did, and time it against eager.

python examples/quickstart.py                 # target="cpu": graphopt passes + inductor
python examples/quickstart.py --target llvm   # TVM for x86 (pip install 'graphopt[tvm]')
python examples/quickstart.py --dtype bfloat16   # convolutions in bf16 (CPUs with AVX512_BF16/AMX)
python examples/quickstart.py --target auto   # the fastest engine here: inductor, onnxruntime,
                                              # OpenVINO (pip install 'graphopt[onnx,openvino]')
"""

import argparse

import torch
from torch import nn

import graphopt
from graphopt.bench import StolenTime, compare_speed, format_timings


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def make_model() -> nn.Module:
    """A ResNet-style classifier: BN stem, three residual stages, global pool, dropout, linear."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        Block(32, 32, 1),
        Block(32, 64, 2),
        Block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(128, 10),
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target", default="cpu", choices=["cpu", "llvm", "onnx", "openvino", "auto"]
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = make_model()
    x = torch.randn(1, 3, 96, 96)
    options = {"target": args.target, "dtype": args.dtype}
    compiled = torch.compile(model, backend="graphopt", options=options)
    with torch.no_grad():
        print(f"compiling with graphopt ({options}) ...", flush=True)
        expected, got = model(x), compiled(x)
    print(graphopt.reports()[-1])
    if args.dtype == "float32":
        graphopt.testing.assert_same_outputs(expected, got)
        print("outputs match eager\n")
    else:  # 16-bit matmuls round: compare by relative error and by the predicted class
        error = graphopt.testing.relative_error(expected, got)
        same = bool((expected.argmax(-1) == got.argmax(-1)).all())
        print(f"relative error vs eager fp32: {error:.2e}, same class: {same}\n")
    with StolenTime() as stolen:
        timings = compare_speed({"eager": model, "graphopt": compiled}, (x,), rounds=args.rounds)
    print(format_timings(timings))
    if stolen.suspect:
        print(f"note: {stolen.warning()}")


if __name__ == "__main__":
    main()
