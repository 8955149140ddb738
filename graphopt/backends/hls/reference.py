"""graphopt's int8 reference: the integer program run in PyTorch with `graphopt.int8`.

This is what the FPGA must compute, bit for bit: the C++ kernels are tested against it
(0 LSB difference), and it is independent of them (exact int64 arithmetic here, the
kernel library's loops there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graphopt import int8
from graphopt.backends.hls.program import Buffer, Layer, Program


def run_program(
    program: Program,
    inputs: Sequence[torch.Tensor],
    *,
    accumulators: dict[str, int] | None = None,
) -> list[torch.Tensor]:
    """The program's float outputs for a batch of float inputs (dim 0 is the batch).

    accumulators: if given, updated with the largest |accumulator| of each layer that has one
    (how many bits the data really needs, against the worst case the C++ types are sized for).
    """
    if len(inputs) != len(program.inputs):
        raise ValueError(f"the program takes {len(program.inputs)} inputs, got {len(inputs)}")
    batch = inputs[0].shape[0]
    env: dict[str, torch.Tensor] = {}
    for name, x in zip(program.inputs, inputs):
        want = program.buffers[name].size
        if x.dtype != torch.float32 or x[0].numel() != want:
            raise ValueError(
                f"input {name}: expected float32 with {want} values per sample, got "
                f"{x.dtype} {tuple(x.shape)}"
            )
        env[name] = x.reshape(batch, -1)
    with torch.no_grad():
        for layer in program.layers:
            env[layer.output] = _run(layer, program, env, accumulators).reshape(batch, -1)
    return [
        env[name].reshape(batch, *program.buffers[name].shape).contiguous()
        for name in program.outputs
    ]


def _shaped(program: Program, env: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return env[name].reshape(env[name].shape[0], *program.buffers[name].shape)


def _run(
    layer: Layer,
    program: Program,
    env: dict[str, torch.Tensor],
    accumulators: dict[str, int] | None,
) -> torch.Tensor:
    p, t = layer.params, layer.tensors
    out = program.buffers[layer.output]
    x = _shaped(program, env, layer.inputs[0])
    if layer.kind == "quantize":
        return int8.quantize(x, out.scale, out.zero_point)
    if layer.kind == "dequantize":
        return int8.dequantize(x, p["scale"], p["zero_point"])
    if layer.kind == "clamp":
        return x.clamp(p["lo"], p["hi"])
    if layer.kind == "requantize":
        terms = [(x, p["in_zero_points"][0])]
        return int8.rescale_add(terms, p["multipliers"], p["shift"], out.zero_point)
    if layer.kind == "add":
        terms = [
            (_shaped(program, env, name), zp) for name, zp in zip(layer.inputs, p["in_zero_points"])
        ]
        y = int8.rescale_add(terms, p["multipliers"], p["shift"], out.zero_point)
        return y.clamp(p["lo"], p["hi"])
    if layer.kind == "concat":
        parts = []
        for name, zp, (multipliers, shift) in zip(layer.inputs, p["in_zero_points"], p["parts"]):
            v = _shaped(program, env, name)
            y = int8.rescale_add([(v, zp)], multipliers, shift, out.zero_point)
            parts.append(y.clamp(p["lo"], p["hi"]).reshape(v.shape[0], -1))
        return torch.cat(parts, dim=1)
    if layer.kind == "maxpool2d":
        # exact on the 8-bit values (max commutes with the monotone dequantize)
        y = torch.nn.functional.max_pool2d(
            x.to(torch.float64), p["kernel"], p["stride"], p["padding"]
        )
        return y.to(torch.uint8)
    if layer.kind == "dense":
        acc = int8.integer_linear(x, p["in_zero_point"], t["weight"], t["bias"])
        return _finish(acc, layer, out, 1, accumulators)
    if layer.kind == "conv2d":
        acc = int8.integer_conv2d(
            x,
            p["in_zero_point"],
            t["weight"],
            t["bias"],
            p["stride"],
            p["padding"],
            p["dilation"],
            p["groups"],
        )
        return _finish(acc, layer, out, 1, accumulators)
    if layer.kind == "avgpool2d":
        # window sums of (q - zp); padding counts as real zeros (count_include_pad)
        centered = x.to(torch.float64) - p["in_zero_point"]
        kh, kw = p["kernel"]
        sums = torch.nn.functional.avg_pool2d(
            centered, p["kernel"], p["stride"], p["padding"], count_include_pad=True
        )
        acc = (sums * (kh * kw)).round().to(torch.int64)
        return _finish(acc, layer, out, None, accumulators)
    raise ValueError(f"unknown layer kind {layer.kind!r}")


def _finish(
    acc: torch.Tensor,
    layer: Layer,
    out: Buffer,
    channel_dim: int | None,
    accumulators: dict[str, int] | None,
) -> torch.Tensor:
    """Accumulators -> the 8-bit output (requantize + clamp) or float (dequantize)."""
    p, t = layer.params, layer.tensors
    if accumulators is not None and acc.numel():
        seen = int(acc.abs().max())
        accumulators[layer.name] = max(accumulators.get(layer.name, 0), seen)

    def per_channel(v: torch.Tensor) -> torch.Tensor:
        if channel_dim is None:
            return v.reshape(())
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        return v.view(shape)

    if out.is_float:
        y = acc.to(torch.int32).to(torch.float32) * per_channel(t["acc_scale"])
        bounds = p.get("float_activation")
        if bounds is not None:
            y = y.clamp(bounds[0], bounds[1])
        return y
    y = int8.requantize(
        acc,
        per_channel(t["m0"].to(torch.int64)),
        per_channel(t["shift"].to(torch.int64) - 31),
        out.zero_point,
    )
    return y.clamp(p["lo"], p["hi"])
