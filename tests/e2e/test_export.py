"""graphopt.export / graphopt.load: artifacts that run, match eager, and are written whole."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

import graphopt
from graphopt.backends.onnx import OnnxBackend
from graphopt.testing import assert_same_outputs, relative_error
from tests.models import MLP, Fn, ResidualCNN, SpectralHead, TransformerBlock

MODELS = {
    "mlp": (MLP, (4, 32)),
    "cnn": (ResidualCNN, (2, 3, 16, 16)),
    "transformer": (TransformerBlock, (2, 10, 32)),
}
# int8 against float eager: what graphopt's per-channel int8 costs on these random models
# (measured 0.5-1.5%); a pass that stayed in float would give ~1e-7.
INT8_RELATIVE_ERROR = (1e-4, 0.05)


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor, list[tuple[torch.Tensor]]]:
    make, shape = MODELS[name]
    calibration = [(torch.randn(*shape),) for _ in range(4)]
    return make().eval(), torch.randn(*shape), calibration


def _assert_matches_eager(expected, got, quantize) -> None:
    if quantize is None:
        assert_same_outputs(expected, got)
    else:  # int8 costs something, but not much
        low, high = INT8_RELATIVE_ERROR
        assert low < relative_error(expected, got) < high


def _files_match_manifest(folder) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = sorted(p.name for p in folder.iterdir())
    assert on_disk == sorted([*manifest["files"], "manifest.json"])
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
        assert not data.startswith(b"\x80"), f"{name} looks like a pickle"
    return manifest


@pytest.mark.parametrize("quantize", [None, "int8"], ids=["fp32", "int8"])
@pytest.mark.parametrize("fmt", ["onnx", "tvm"])
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_artifact_loads_runs_and_matches_eager(tmp_path, name, fmt, quantize):
    model, x, calibration = _model(name)
    options = {"quantize": quantize, "calibration": calibration} if quantize else {}
    exported = graphopt.export(model, (x,), tmp_path / "art", format=fmt, progress=False, **options)
    manifest = _files_match_manifest(exported.path)
    assert manifest["format"] == fmt and manifest["target"] == ("onnx" if fmt == "onnx" else "llvm")
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": list(x.shape)}]
    assert manifest["verification"]["ran"]
    assert set(manifest["versions"]) >= {"graphopt", "torch"}
    assert (quantize is not None) == (exported.report.quantization is not None)

    artifact = graphopt.load(exported.path)
    y = torch.randn_like(x)  # not the example input the export verified with
    with torch.no_grad():
        expected, got = model(y), artifact(y)
    _assert_matches_eager(expected, got, quantize)


def test_onnx_artifact_runs_in_plain_onnxruntime(tmp_path):
    import onnx
    import onnxruntime as ort

    model, x, calibration = _model("cnn")
    path = graphopt.export(
        model, (x,), tmp_path / "q", quantize="int8", calibration=calibration, progress=False
    ).path
    proto = onnx.load(path / "model.onnx")
    onnx.checker.check_model(proto, full_check=True)
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(graphopt.load(path)(x), torch.from_numpy(out))


def test_tvm_library_main_takes_only_the_inputs(tmp_path):
    import tvm
    from tvm import relax

    model, x, _ = _model("mlp")
    path = graphopt.export(model, (x,), tmp_path / "t", format="tvm", progress=False).path
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path / "model.so")), tvm.cpu())
    (out,) = vm["main"](tvm.runtime.tensor(x.numpy()))  # weights are inside the library
    with torch.no_grad():
        assert_same_outputs(model(x), torch.from_numpy(out.numpy()))


@pytest.mark.parametrize("fmt", ["onnx", "tvm"])
def test_artifact_with_a_dynamic_batch(tmp_path, fmt):
    model, x, _ = _model("transformer")
    batch = torch.export.Dim("batch", max=64)
    exported = graphopt.export(
        model,
        (x,),
        tmp_path / "d",
        format=fmt,
        dynamic_shapes={"x": {0: batch}},
        progress=False,
    )
    (spec,) = exported.manifest["inputs"]
    assert spec["shape"] == ["batch", 10, 32]  # the user's name for the dim, not torch's s77
    assert exported.manifest["outputs"][0]["shape"] == ["batch", 10, 32]
    if fmt == "onnx":
        import onnx

        (onnx_input,) = onnx.load(exported.path / "model.onnx").graph.input
        dims = onnx_input.type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == ["batch", 10, 32]
    artifact = graphopt.load(exported.path)
    for n in (1, 5):
        y = torch.randn(n, 10, 32)
        with torch.no_grad():
            assert_same_outputs(model(y), artifact(y))
    with pytest.raises(ValueError, match=r"input 'x' has shape \[3, 11, 32\]"):
        artifact(torch.randn(3, 11, 32))


def test_load_checks_inputs(tmp_path):
    model, x, _ = _model("mlp")
    artifact = graphopt.load(graphopt.export(model, (x,), tmp_path / "a", progress=False).path)
    with pytest.raises(ValueError, match=r"input 'x' is float64\[4, 32\].*float32\[4, 32\]"):
        artifact(x.double())
    with pytest.raises(ValueError, match=r"input 'x' has shape \[5, 32\]"):
        artifact(torch.randn(5, 32))
    with pytest.raises(TypeError, match="exported for inputs"):
        artifact(x, x)


def test_load_refuses_changed_or_missing_files(tmp_path):
    model, x, _ = _model("mlp")
    path = graphopt.export(model, (x,), tmp_path / "a", progress=False).path
    data = bytearray((path / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.onnx does not match its sha256"):
        graphopt.load(path)
    (path / "model.onnx").unlink()
    with pytest.raises(ValueError, match="model.onnx is missing"):
        graphopt.load(path)
    with pytest.raises(ValueError, match="not a graphopt artifact"):
        graphopt.load(tmp_path)


def test_a_failed_export_leaves_nothing(tmp_path):
    model, x = SpectralHead().eval(), torch.randn(2, 16)  # fft: no TVM rule
    with pytest.raises(
        graphopt.UnsupportedOpError, match=r"(?s)cannot run them in PyTorch.*_fft_r2c.*abs_1"
    ):
        graphopt.export(model, (x,), tmp_path / "a", format="tvm", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_a_whole_new_artifact(tmp_path, monkeypatch):
    model, x, _ = _model("mlp")
    out = tmp_path / "a"
    first = graphopt.export(model, (x,), out, progress=False).manifest
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        graphopt.export(model, (x,), out, progress=False)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while writing")

    monkeypatch.setattr(OnnxBackend, "write", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        graphopt.export(model, (x,), out, overwrite=True, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == first  # the old one, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    monkeypatch.undo()
    second = graphopt.export(MLP().eval(), (x,), out, overwrite=True, progress=False).manifest
    assert second["files"]["model.onnx"]["sha256"] != first["files"]["model.onnx"]["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (
            {"format": "tflite"},
            r"format 'tflite'; accepted formats: \['onnx', 'openvino', 'tvm', 'stablehlo', 'hls'\]",
        ),
        ({"format": "onnx", "target": "llvm"}, "target='llvm' does not apply"),
        ({"format": "tvm", "target": "cpu"}, r"accepted targets: \['llvm', 'aarch64', 'cuda'\]"),
        ({"quantize": "int8"}, "needs calibration data"),
        ({"quantize": "int8", "calibration": 8}, "needs calibration data"),
        ({"quantise": "int8"}, "unknown graphopt option 'quantise'"),
        ({"tvm_target": {"kind": "llvm"}}, "tvm_target applies to format='tvm' only"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, error):
    model, x, _ = _model("mlp")
    with pytest.raises(ValueError, match=error):
        graphopt.export(model, (x,), tmp_path / "a", progress=False, **kwargs)
    assert not (tmp_path / "a").exists()


def test_progress_goes_to_stderr(tmp_path, capsys):
    model, x, _ = _model("mlp")
    graphopt.export(model, (x,), tmp_path / "a", format="tvm")
    err = capsys.readouterr().err
    for step in ("capturing MLP", "running graphopt's passes", "compiling with TVM", "wrote"):
        assert step in err


def test_cuda_library_is_built_and_its_kernels_compile_without_a_gpu(tmp_path):
    model, x, _ = _model("transformer")
    exported = graphopt.export(model, (x,), tmp_path / "c", format="tvm", target="cuda")
    import tvm

    gpu = tvm.cuda(0)  # with a GPU visible, its architecture; without, the default sm_80
    arch = "sm_" + gpu.compute_version.replace(".", "") if gpu.exist else "sm_80"
    tvm_info = exported.manifest["tvm"]
    assert tvm_info["target"]["kind"] == "cuda" and tvm_info["target"]["arch"] == arch
    if shutil.which("nvcc"):
        kernels = int(tvm_info["nvcc"].split()[0])
        assert kernels >= 10, tvm_info["nvcc"]
    if not gpu.exist:
        assert exported.manifest["verification"]["ran"] is False
        with pytest.raises(RuntimeError, match="CUDA library and this machine has no CUDA GPU"):
            graphopt.load(exported.path)


def test_tvm_target_picks_the_cuda_architecture(tmp_path):
    model, x, _ = _model("mlp")
    exported = graphopt.export(
        model,
        (x,),
        tmp_path / "h",
        format="tvm",
        target="cuda",
        tvm_target={"kind": "cuda", "arch": "sm_90"},
        progress=False,
    )
    assert exported.manifest["tvm"]["target"]["arch"] == "sm_90"
    if shutil.which("nvcc"):
        assert exported.manifest["tvm"]["nvcc"].endswith("kernels compiled to PTX for sm_90")


@pytest.mark.parametrize(
    "target, tvm_target, error",
    [
        ("cuda", {"kind": "llvm"}, "does not build for target='cuda': it needs kind 'cuda'"),
        ("aarch64", {"kind": "llvm"}, "needs kind 'llvm' with an aarch64 mtriple"),
        ("llvm", {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, "and no aarch64 mtriple"),
        ("llvm", {"kind": "no-such-kind"}, "is not a valid TVM target"),
        ("llvm", "llvm -mcpu=znver3", "must be a dict"),
    ],
)
def test_a_tvm_target_of_another_kind_is_refused(tmp_path, target, tvm_target, error):
    model, x, _ = _model("mlp")
    with pytest.raises(ValueError, match=error):
        graphopt.export(
            model, (x,), tmp_path / "a", format="tvm", target=target, tvm_target=tvm_target
        )
    assert not (tmp_path / "a").exists()


@pytest.mark.needs_gpu
def test_cuda_artifact_runs_on_the_gpu_and_matches_eager(tmp_path):
    model, x, _ = _model("transformer")
    exported = graphopt.export(model, (x,), tmp_path / "c", format="tvm", target="cuda")
    assert exported.manifest["verification"]["ran"] == "on the GPU (TVM runtime)"
    with torch.no_grad():
        assert_same_outputs(model(x), graphopt.load(exported.path)(x.cuda()).cpu())


@pytest.mark.needs_qemu
@pytest.mark.parametrize(
    "name, quantize", [("mlp", None), ("cnn", None), ("transformer", None), ("cnn", "int8")]
)
def test_aarch64_library_runs_under_qemu_and_matches_eager(tmp_path, name, quantize):
    model, x, calibration = _model(name)
    options = {"quantize": quantize, "calibration": calibration} if quantize else {}
    exported = graphopt.export(
        model, (x,), tmp_path / "arm", format="tvm", target="aarch64", progress=False, **options
    )
    manifest = _files_match_manifest(exported.path)
    assert manifest["tvm"]["target"]["mtriple"] == "aarch64-linux-gnu"
    assert manifest["tvm"]["cpu_features"] == ["neon"]
    assert manifest["verification"]["ran"] == "under qemu-aarch64 (graphopt/backends/tvm/runner)"
    assert (exported.path / "model.so").read_bytes()[18] == 0xB7  # ELF e_machine: AArch64

    artifact = graphopt.load(exported.path)  # on this x86 host: through qemu
    y = torch.randn_like(x)
    with torch.no_grad():
        expected, got = model(y), artifact(y)
    _assert_matches_eager(expected, got, quantize)


@pytest.mark.needs_qemu
def test_aarch64_sve_library_records_and_checks_its_features(tmp_path):
    from graphopt.backends.tvm import aarch64

    model, x, _ = _model("mlp")
    sve = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+sve"]}
    exported = graphopt.export(
        model, (x,), tmp_path / "sve", format="tvm", target="aarch64", tvm_target=sve
    )
    assert exported.manifest["tvm"]["cpu_features"] == ["neon", "sve"]
    assert exported.manifest["verification"]["ran"]  # qemu's default core has SVE
    library, features = exported.path / "model.so", exported.manifest["tvm"]["cpu_features"]
    with pytest.raises(RuntimeError, match="built for \\+sve but this CPU does not have sve"):
        aarch64.run_library(library, [x.numpy()], cpu="cortex-a72", require=features)


@pytest.mark.parametrize("quantize", [None, "int8"], ids=["fp32", "int8"])
def test_an_artifact_that_computes_wrong_numbers_is_not_written(tmp_path, monkeypatch, quantize):
    model, x, calibration = _model("cnn")
    options = {"quantize": quantize, "calibration": calibration} if quantize else {}
    run_flat = graphopt.Artifact.run_flat

    def off_by_a_fifth(self, inputs):  # e.g. a requantization scale that is wrong by 20%
        return tuple(1.2 * y for y in run_flat(self, inputs))

    monkeypatch.setattr(graphopt.Artifact, "run_flat", off_by_a_fifth)
    with pytest.raises(graphopt.VerificationError, match="'onnx artifact' changed the outputs"):
        graphopt.export(model, (x,), tmp_path / "a", progress=False, **options)
    assert list(tmp_path.iterdir()) == []


def test_an_output_container_torch_cannot_serialize_is_named(tmp_path):
    import dataclasses

    @dataclasses.dataclass
    class Pair:
        a: torch.Tensor
        b: torch.Tensor

    torch.utils._pytree.register_dataclass(Pair)  # export can trace it, but it has no JSON name
    model = Fn(lambda self, x: Pair(x + 1, x * 2)).eval()
    with pytest.raises(ValueError, match="outputs use a container type that cannot be written"):
        graphopt.export(model, (torch.randn(2, 3),), tmp_path / "a", progress=False)
    assert list(tmp_path.iterdir()) == []
