"""The layer kinds of an integer `Program`, one object each: what it computes in graphopt's
int8 reference (`run`), its call into the C++ kernel library (`cpp`), its config struct in
parameters.h (`config`), and what the resource estimate needs to know (`mac`, `window`,
`rescales`, `accumulates`).

`program.py` builds layers of these kinds from the quantized graph; `reference.py`,
`project.py` and `estimate.py` look each layer's kind up in `KINDS`. Adding a kind is one class
here (and its kernel in kernels/graphopt_kernels.h).
"""

from __future__ import annotations

from typing import Any

import torch

from graphopt import int8
from graphopt.backends.hls.program import Buffer, Layer, Program, accumulator_bits

Env = dict[str, torch.Tensor]  # buffer name -> [batch, size] values


class Kind:
    """One layer kind. `mac`: multiply-accumulates with weights (reuse factors, multipliers);
    `window`: reads a pooling window per output; `rescales`: needs a requantize multiplier;
    `accumulates`: sums into an accumulator (its C type is in the config struct)."""

    name = ""
    mac = False
    window = False
    rescales = False
    accumulates = False  # an accumulator type in its config (sized by `accumulator_bits`)

    def run(self, layer: Layer, program: Program, env: Env, accumulators: Any) -> torch.Tensor:
        raise NotImplementedError(self.name)

    def cpp(self, layer: Layer, program: Program, names: dict[str, str]) -> list[str]:
        raise NotImplementedError(self.name)

    def config(self, layer: Layer, program: Program) -> list[tuple[str, int]] | None:
        """The fields of the layer's config struct (None: the kernel takes none)."""
        return None

    def pixels(self, layer: Layer) -> int:
        """Outputs per sample that each reuse the layer's weights (conv2d: output pixels)."""
        return 1

    def macs(self, layer: Layer) -> int:
        """Multiply-accumulates per sample (0 for a layer without weights)."""
        return int(layer.tensors["weight"].numel()) * self.pixels(layer) if self.mac else 0


class Quantize(Kind):
    name = "quantize"

    def run(self, layer, program, env, accumulators):
        out = program.buffers[layer.output]
        return int8.quantize(shaped(program, env, layer.inputs[0]), out.scale, out.zero_point)

    def cpp(self, layer, program, names):
        ins, out, buffer = _io(layer, program, names)
        return [
            f"graphopt::quantize<{buffer.size}>({ins[0]}, {out}, "
            f"{cpp_float(layer.params['inv_scale'])}, {buffer.zero_point});"
        ]


class Dequantize(Kind):
    name = "dequantize"

    def run(self, layer, program, env, accumulators):
        p = layer.params
        return int8.dequantize(shaped(program, env, layer.inputs[0]), p["scale"], p["zero_point"])

    def cpp(self, layer, program, names):
        p = layer.params
        ins, out, buffer = _io(layer, program, names)
        return [
            f"graphopt::dequantize<{buffer.size}>({ins[0]}, {out}, {cpp_float(p['scale'])}, "
            f"{p['zero_point']});"
        ]


class Clamp(Kind):
    name = "clamp"

    def run(self, layer, program, env, accumulators):
        return shaped(program, env, layer.inputs[0]).clamp(layer.params["lo"], layer.params["hi"])

    def cpp(self, layer, program, names):
        p = layer.params
        ins, out, buffer = _io(layer, program, names)
        return [f"graphopt::clamp<{buffer.size}>({ins[0]}, {out}, {p['lo']}, {p['hi']});"]


class Requantize(Kind):
    name = "requantize"
    rescales = True

    def run(self, layer, program, env, accumulators):
        p, out = layer.params, program.buffers[layer.output]
        terms = [(shaped(program, env, layer.inputs[0]), p["in_zero_points"][0])]
        return int8.rescale_add(terms, p["multipliers"], p["shift"], out.zero_point)

    def cpp(self, layer, program, names):
        p = layer.params
        ins, out, buffer = _io(layer, program, names)
        (m,), s = p["multipliers"], p["shift"]
        zx = p["in_zero_points"][0]
        return [
            f"graphopt::rescale<{buffer.size}>({ins[0]}, {out}, {zx}, {m}, {s}, "
            f"{buffer.zero_point}, 0, 255);"
        ]


class Add(Kind):
    name = "add"
    rescales = True

    def run(self, layer, program, env, accumulators):
        p, out = layer.params, program.buffers[layer.output]
        terms = [
            (shaped(program, env, name), zp) for name, zp in zip(layer.inputs, p["in_zero_points"])
        ]
        y = int8.rescale_add(terms, p["multipliers"], p["shift"], out.zero_point)
        return y.clamp(p["lo"], p["hi"])

    def cpp(self, layer, program, names):
        p = layer.params
        ins, out, buffer = _io(layer, program, names)
        (za, zb), (ma, mb) = p["in_zero_points"], p["multipliers"]
        return [
            f"graphopt::add<{buffer.size}>({ins[0]}, {ins[1]}, {out}, {za}, {ma}, {zb}, {mb}, "
            f"{p['shift']}, {p['out_zero_point']}, {p['lo']}, {p['hi']});"
        ]


class Concat(Kind):
    name = "concat"
    rescales = True

    def run(self, layer, program, env, accumulators):
        p, out = layer.params, program.buffers[layer.output]
        parts = []
        for name, zp, (multipliers, shift) in zip(layer.inputs, p["in_zero_points"], p["parts"]):
            v = shaped(program, env, name)
            y = int8.rescale_add([(v, zp)], multipliers, shift, out.zero_point)
            parts.append(y.clamp(p["lo"], p["hi"]).reshape(v.shape[0], -1))
        return torch.cat(parts, dim=1)

    def cpp(self, layer, program, names):
        p = layer.params
        _, out, _ = _io(layer, program, names)
        calls, offset = [], 0
        for name, zx, ((m,), s) in zip(layer.inputs, p["in_zero_points"], p["parts"]):
            n = program.buffers[name].size
            calls.append(
                f"graphopt::rescale<{n}>({names.get(name, name)}, {out} + {offset}, {zx}, {m}, "
                f"{s}, {p['out_zero_point']}, {p['lo']}, {p['hi']});"
            )
            offset += n
        return calls


class _Pool(Kind):
    window = True

    def config(self, layer, program):
        p = layer.params
        c, h, w = program.buffers[layer.inputs[0]].shape
        ho, wo = pool_out(program, layer)
        fields = [("c", c), ("h", h), ("w", w), ("ho", ho), ("wo", wo)]
        fields += [("kh", p["kernel"][0]), ("kw", p["kernel"][1])]
        fields += [("sh", p["stride"][0]), ("sw", p["stride"][1])]
        fields += [("ph", p["padding"][0]), ("pw", p["padding"][1])]
        return fields


class MaxPool2d(_Pool):
    name = "maxpool2d"

    def run(self, layer, program, env, accumulators):
        # exact on the 8-bit values (max commutes with the monotone dequantize)
        p = layer.params
        x = shaped(program, env, layer.inputs[0])
        y = torch.nn.functional.max_pool2d(
            x.to(torch.float64), p["kernel"], p["stride"], p["padding"]
        )
        return y.to(torch.uint8)

    def cpp(self, layer, program, names):
        ins, out, _ = _io(layer, program, names)
        return [f"graphopt::maxpool2d<{layer.name}_cfg>({ins[0]}, {out});"]


class AvgPool2d(_Pool):
    name = "avgpool2d"
    rescales = True
    accumulates = True

    def run(self, layer, program, env, accumulators):
        # window sums of (q - zp); padding counts as real zeros (count_include_pad)
        p = layer.params
        centered = shaped(program, env, layer.inputs[0]).to(torch.float64) - p["in_zero_point"]
        kh, kw = p["kernel"]
        sums = torch.nn.functional.avg_pool2d(
            centered, p["kernel"], p["stride"], p["padding"], count_include_pad=True
        )
        acc = (sums * (kh * kw)).round().to(torch.int64)
        return finish(acc, layer, program.buffers[layer.output], None, accumulators)

    def cpp(self, layer, program, names):
        ins, out, buffer = _io(layer, program, names)
        return [f"graphopt::avgpool2d<{layer.name}_cfg>({ins[0]}, {out}, {stage(layer, buffer)});"]


class _Mac(Kind):
    mac = True
    accumulates = True

    def cpp(self, layer, program, names):
        ins, out, buffer = _io(layer, program, names)
        return [
            f"graphopt::{self.name}<{layer.name}_cfg>({ins[0]}, {out}, {layer.name}_w, "
            f"{layer.name}_b, {stage(layer, buffer)});"
        ]


class Dense(_Mac):
    name = "dense"

    def run(self, layer, program, env, accumulators):
        p, t = layer.params, layer.tensors
        x = shaped(program, env, layer.inputs[0])
        acc = int8.integer_linear(x, p["in_zero_point"], t["weight"], t["bias"])
        return finish(acc, layer, program.buffers[layer.output], 1, accumulators)

    def config(self, layer, program):
        n_out, n_in = layer.tensors["weight"].shape
        return [("n_in", n_in), ("n_out", n_out)]


class Conv2d(_Mac):
    name = "conv2d"

    def run(self, layer, program, env, accumulators):
        p, t = layer.params, layer.tensors
        acc = int8.integer_conv2d(
            shaped(program, env, layer.inputs[0]),
            p["in_zero_point"],
            t["weight"],
            t["bias"],
            p["stride"],
            p["padding"],
            p["dilation"],
            p["groups"],
        )
        return finish(acc, layer, program.buffers[layer.output], 1, accumulators)

    def pixels(self, layer):
        _, ho, wo = layer.params["out_shape"]
        return ho * wo

    def config(self, layer, program):
        p = layer.params
        ci, h, w = p["in_shape"]
        co, ho, wo = p["out_shape"]
        fields = [("ci", ci), ("h", h), ("w", w), ("co", co), ("ho", ho), ("wo", wo)]
        fields += [("kh", p["kernel"][0]), ("kw", p["kernel"][1])]
        fields += [("sh", p["stride"][0]), ("sw", p["stride"][1])]
        fields += [("ph", p["padding"][0]), ("pw", p["padding"][1])]
        fields += [("dh", p["dilation"][0]), ("dw", p["dilation"][1]), ("groups", p["groups"])]
        return fields


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Quantize(),
        Dequantize(),
        Clamp(),
        Requantize(),
        Add(),
        Concat(),
        MaxPool2d(),
        AvgPool2d(),
        Dense(),
        Conv2d(),
    )
}


def kind_of(layer: Layer) -> Kind:
    if layer.kind not in KINDS:
        raise ValueError(f"unknown layer kind {layer.kind!r}; kinds: {sorted(KINDS)}")
    return KINDS[layer.kind]


# -- shared by the kinds ---------------------------------------------------------------------


def shaped(program: Program, env: Env, name: str) -> torch.Tensor:
    """A buffer's values with their per-sample shape back ([batch, *shape])."""
    return env[name].reshape(env[name].shape[0], *program.buffers[name].shape)


def finish(
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


def cpp_float(v: float) -> str:
    """A float32 literal that parses back to exactly the same float32."""
    text = f"{float(torch.tensor(v, dtype=torch.float32)):.9g}"
    if not any(c in text for c in ".en"):  # "2" -> "2.0" (a float literal needs a point)
        text += ".0"
    return text + "f"


def acc_type(layer: Layer) -> tuple[str, int]:
    """(C type, bits needed) of a layer's accumulator, from its worst-case bound."""
    bits = accumulator_bits(layer)
    return ("int32_t" if bits <= 32 else "int64_t"), bits


def stage(layer: Layer, buffer: Buffer) -> str:
    """The output stage of an accumulating kernel: dequantize to float, or requantize."""
    p = layer.params
    if buffer.is_float:
        bounds = p.get("float_activation")
        lo, hi = bounds if bounds is not None else (float("-inf"), float("inf"))
        has_lo, has_hi = lo != float("-inf"), hi != float("inf")
        return (
            f"graphopt::Dequantize{{{layer.name}_scale, {str(has_lo).lower()}, "
            f"{str(has_hi).lower()}, {cpp_float(lo) if has_lo else '0.0f'}, "
            f"{cpp_float(hi) if has_hi else '0.0f'}}}"
        )
    return (
        f"graphopt::Requantize{{{layer.name}_m0, {layer.name}_shift, {p['out_zero_point']}, "
        f"{p['lo']}, {p['hi']}}}"
    )


def pool_out(program: Program, layer: Layer) -> tuple[int, int]:
    """A pooling layer's output height and width."""
    out = program.buffers[layer.output]
    c = program.buffers[layer.inputs[0]].shape[0]
    hw = out.size // c
    h, w = program.buffers[layer.inputs[0]].shape[1:]
    (kh, kw), (sh, sw), (ph, pw) = (
        layer.params["kernel"],
        layer.params["stride"],
        layer.params["padding"],
    )
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    assert ho * wo == hw, (layer.name, ho, wo, hw)
    return ho, wo


def _io(layer: Layer, program: Program, names: dict[str, str]) -> tuple[list[str], str, Buffer]:
    """(input names, output name, output buffer) of a layer in the top function."""
    ins = [names.get(n, n) for n in layer.inputs]
    return ins, names.get(layer.output, layer.output), program.buffers[layer.output]
