"""FPGA: export a digits classifier as a Vitis-HLS C++ project, C-simulate it, check it.

python examples/fpga_digits.py --out hls_digits            # the CNN, ZCU102 defaults
python examples/fpga_digits.py --model mlp --part xc7z020clg400-1 --max-dsp 200

Trains a small model on scikit-learn's digits, quantizes it to int8 on training images,
writes the project (firmware/, tb/, Makefile, build_prj.tcl, estimates.json), runs its C
simulation on the 500 held-out images and prints accuracy, bit-exactness against graphopt's
int8 reference, and the resource/latency estimates. Needs g++ and scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import graphopt
from graphopt import int8_program
from graphopt.backends.hls import run_program

try:
    from examples.int8_digits import BATCH, DigitsCNN, DigitsMLP, load_digits_split, train
except ImportError:  # run as a script from examples/ or the project root
    from int8_digits import BATCH, DigitsCNN, DigitsMLP, load_digits_split, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--out", default="hls_digits", help="the project folder to write")
    parser.add_argument("--part", default="xczu9eg-ffvb1156-2-e")
    parser.add_argument("--clock-ns", type=float, default=5.0)
    parser.add_argument("--max-dsp", type=int, default=None)
    args = parser.parse_args()

    train_data, (x, y) = load_digits_split()
    model = train(DigitsCNN() if args.model == "cnn" else DigitsMLP(), train_data)
    calibration = [(train_data[0][i : i + BATCH],) for i in range(0, 4 * BATCH, BATCH)]
    options = {"part": args.part, "clock_ns": args.clock_ns}
    if args.max_dsp is not None:
        options["max_dsp"] = args.max_dsp
    batch = torch.export.Dim("batch")
    exported = graphopt.export(
        model, (x[:8],), args.out, format="hls", quantize="int8", calibration=calibration,
        dynamic_shapes={"x": {0: batch}}, hls_options=options,
        overwrite=True,
    )  # fmt: skip

    start = time.perf_counter()
    csim = graphopt.load(exported.path)(x)  # builds the testbench with g++, runs all 500
    seconds = time.perf_counter() - start
    with torch.no_grad():
        float_logits = model(x)
    # graphopt's int8 reference: the same integer program, computed exactly in PyTorch
    program = int8_program(model, (x[:8],), calibration, dynamic_shapes={"x": {0: batch}})
    reference = run_program(program, [x])[0]

    def top1(logits: torch.Tensor) -> float:
        return 100 * (logits.argmax(1) == y).float().mean().item()

    print(f"\n{args.model} on {len(y)} held-out digits:")
    print(f"  float top-1          {top1(float_logits):.1f}%")
    print(f"  FPGA C simulation    {top1(csim):.1f}%  ({seconds:.2f}s incl. g++ build)")
    print(f"  bit-exact with graphopt's int8 reference: {torch.equal(csim, reference)}")
    estimates = json.loads((exported.path / "estimates.json").read_text())
    total = estimates["total"]
    print(f"\nestimates for {estimates['part']} at {estimates['clock_ns']} ns (analytical):")
    print(
        f"  {total['dsp']} DSP, {total['bram18']} BRAM18, {total['lut']} LUT, "
        f"latency {total['latency_us']:.2f} us, {total['throughput_per_s']:.0f} samples/s"
    )
    for layer in estimates["layers"]:
        if "multipliers" in layer:
            acc = layer["accumulator"]
            print(
                f"  {layer['layer']:<22} reuse {layer['reuse_factor']:>3}  "
                f"{layer['multipliers']:>5} mult  {layer['cycles']:>6} cycles  "
                f"acc {acc['bits']} bits ({acc['headroom_bits']} spare on calibration data)"
            )
    print(f"\nproject: {exported.path} (make csim; vitis_hls -f build_prj.tcl)")


if __name__ == "__main__":
    main()
