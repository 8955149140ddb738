"""target="openvino": the optimized graph run by Intel's OpenVINO runtime (CPU).

The graph reaches OpenVINO through graphopt's ONNX translation (`backends/onnx.py`: torch.export
then torch.onnx), which OpenVINO's ONNX frontend reads: one translation of ATen for both
runtimes, already tested op by op, rather than a second one through OpenVINO's PyTorch
frontend (its `torch.compile` backend fails on the CNNs of the benchmarks with torch 2.13,
issue #32). int8 graphs arrive as QuantizeLinear/DequantizeLinear pairs, which OpenVINO's
low-precision transformations turn into its int8 kernels.

OpenVINO's CPU plugin computes in bfloat16 by default on CPUs that have it (AVX-512 BF16, AMX):
graphopt asks for f32 (`INFERENCE_PRECISION_HINT`) so that answers do not change silently,
and for as many threads as torch uses. Artifacts are OpenVINO IR (`model.xml`, `model.bin`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from graphopt.backends.base import Backend, Compiled, ExportJob
from graphopt.backends.onnx import _checked, export_onnx
from graphopt.backends.registry import OpRegistry
from graphopt.config import Config

OPENVINO = OpRegistry("openvino", supports_all=True)


class OpenVINOBackend(Backend):
    """The whole graph as one OpenVINO model compiled for the CPU plugin in f32; artifacts are
    OpenVINO IR, read back and run at export."""

    label = "openvino"
    registry = OPENVINO
    model_file = "model.xml"
    versions = ("openvino",)

    def compile(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        cfg: Config,
        *,
        training: bool = False,
        backward: bool = False,
    ) -> Compiled:
        if not all(isinstance(x, torch.Tensor) for x in example_inputs):
            raise NotImplementedError(
                "target='openvino' under torch.compile takes static shapes only (dynamo passes "
                "dynamic sizes as inputs of their own); graphopt.export(..., format='openvino', "
                "dynamic_shapes=...) writes a model with dynamic dims"
            )
        return self.from_onnx(export_onnx(gm, example_inputs), example_inputs)

    def from_onnx(self, data: bytes, example_inputs: Sequence[Any]) -> Compiled:
        """The model of an ONNX export of the graph (`export_onnx`), compiled for the CPU:
        target="auto" exports once for onnxruntime and OpenVINO."""
        return Compiled(_checked(OpenVINORunner(read_onnx(data)), example_inputs, "OpenVINO"))

    def write(self, job: ExportJob, folder: Path) -> dict[str, Any]:
        import openvino as ov

        job.say("exporting to ONNX (torch.onnx) for OpenVINO's ONNX frontend")
        traced = [n.meta["val"] for n in job.gm.graph.find_nodes(op="placeholder")]  # symbolic
        model = read_onnx(export_onnx(job.gm, traced, job.dim_names))
        job.say("writing OpenVINO IR (model.xml, model.bin)")
        # float32 weights as they are (save_model halves them to float16 by default)
        ov.save_model(model, str(folder / self.model_file), compress_to_fp16=False)
        return {}

    def where_artifact_runs(self, cfg: Config) -> str:
        return "in OpenVINO (CPU, f32)"

    def load(self, folder: Path, manifest: dict[str, Any]) -> Callable[..., Any]:
        import openvino as ov

        return OpenVINORunner(ov.Core().read_model(str(folder / manifest["model"])))


def read_onnx(data: bytes) -> Any:
    """An `openvino.Model` from a serialized ONNX model."""
    import openvino as ov

    return ov.Core().read_model(model=data, weights=b"")


def compile_options() -> dict[str, Any]:
    """The CPU plugin's options graphopt compiles with (and the benchmarks' OpenVINO anchor):
    f32 arithmetic, one stream for latency, torch's thread count."""
    return {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
    }


class OpenVINORunner:
    """An OpenVINO model compiled for the CPU; call it with torch tensors in the model's input
    order to get a tuple of torch tensors. Inputs are read in place (`share_inputs`); outputs
    are copied out of the request's buffers, which the next call overwrites."""

    def __init__(self, model: Any):
        import openvino as ov

        self.compiled = ov.Core().compile_model(model, "CPU", compile_options())
        self.request = self.compiled.create_infer_request()
        self.num_inputs = len(self.compiled.inputs)

    def __call__(self, *args: Any) -> tuple[torch.Tensor, ...]:
        feeds = {i: a.detach().contiguous().numpy() for i, a in enumerate(args)}
        results = self.request.infer(feeds, share_inputs=True, share_outputs=False)
        return tuple(torch.from_numpy(results[out]) for out in self.compiled.outputs)
