"""graphopt: a compiler-style graph optimizer for PyTorch.

compiled = torch.compile(model, backend="graphopt", options={"target": "cpu"})
optimized = graphopt.optimize(model, example_inputs, target="llvm")
print(optimized.report)
pruned = graphopt.prune(model, example_inputs, sparsity=0.5, structured=True)
graphopt.recover(pruned, teacher=model, data=batches, steps=300)
graphopt.tune(model, example_inputs, budget_s=600)  # TVM schedules for target="llvm"
graphopt.export(model, example_inputs, "out/", format="onnx"); run = graphopt.load("out/")
program = graphopt.int8_program(model, example_inputs, batches)  # the FPGA's integer program
graphopt.quantize_weights_(llm, "int4_weight_only", group_size=128)  # in place, no float copy
"""

from graphopt import plan, testing
from graphopt.api import OptimizedModule, int8_program, optimize, prune, tune
from graphopt.artifact import Artifact, Exported, export, load
from graphopt.backend import graphopt_backend
from graphopt.compiler import REPORTS
from graphopt.config import Config
from graphopt.errors import UnsupportedOpError, VerificationError
from graphopt.quantized_linear import QuantizedLinear, quantize_weights_
from graphopt.recover import Recovery, recover
from graphopt.report import Report
from graphopt.version import __version__


def reports() -> list[Report]:
    """Reports of every graph graphopt compiled in this process (oldest first)."""
    return list(REPORTS)


def clear_reports() -> None:
    REPORTS.clear()


__all__ = [
    "Artifact",
    "Config",
    "Exported",
    "OptimizedModule",
    "Report",
    "UnsupportedOpError",
    "VerificationError",
    "QuantizedLinear",
    "clear_reports",
    "export",
    "graphopt_backend",
    "int8_program",
    "load",
    "optimize",
    "plan",
    "prune",
    "quantize_weights_",
    "recover",
    "Recovery",
    "testing",
    "tune",
    "reports",
    "__version__",
]
