"""graphopt's int8 reference: the integer program run in PyTorch with `graphopt.int8`.

Each layer runs as its kind says (`kinds.py`). This is what the FPGA must compute, bit for
bit: the C++ kernels are tested against it (0 LSB difference), and it is independent of them
(exact int64 arithmetic here, the kernel library's loops there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graphopt.backends.hls.kinds import kind_of
from graphopt.backends.hls.program import Program


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
            out = kind_of(layer).run(layer, program, env, accumulators)
            env[layer.output] = out.reshape(batch, -1)
    return [
        env[name].reshape(batch, *program.buffers[name].shape).contiguous()
        for name in program.outputs
    ]
