import json
import textwrap

from graphopt.cli import main


def test_ops_lists_the_tvm_rules(capsys):
    assert main(["ops", "--target", "llvm"]) == 0
    out = capsys.readouterr().out
    assert "aten.convolution.default" in out and "ops with lowering rules" in out


def test_ops_for_cpu_says_inductor_takes_everything(capsys):
    assert main(["ops", "--target", "cpu"]) == 0
    assert "takes the whole graph" in capsys.readouterr().out


def test_bench_compiles_checks_and_times_a_model_file(tmp_path, capsys):
    model_file = _model_file(
        tmp_path,
        """
        import torch

        def make():
            return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    """,
    )
    assert main(["bench", f"{model_file}:make", "--input", "2,8", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "outputs match eager" in out
    assert "| graphopt |" in out and "fold_constants" in out


def test_bench_int8_calibrates_and_reports_its_error(tmp_path, capsys):
    model_file = _model_file(
        tmp_path,
        "import torch\n\ndef make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), "
        "torch.nn.Linear(16, 4))\n",
    )
    argv = ["bench", f"{model_file}:make", "--input", "4,8", "--rounds", "2"]
    assert main([*argv, "--option", "quantize=int8"]) == 0
    out = capsys.readouterr().out
    assert "calibrating on 4 random batches" in out
    assert "2/2 conv/linear layers quantized" in out
    assert "int8 relative output error vs eager" in out and "| graphopt |" in out


def test_bad_option_is_a_clean_error(tmp_path, capsys):
    assert main(["bench", "x.py:make", "--input", "2,8", "--option", "quantise=int8"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'quantize'" in err


def test_export_writes_an_artifact_that_run_loads_and_times(tmp_path, capsys):
    model_file = _model_file(
        tmp_path,
        """
        import torch

        def make():
            return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    """,
    )
    out_dir = tmp_path / "artifact"
    argv = ["export", f"{model_file}:make", str(out_dir), "--input", "2,8", "--format", "tvm"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "ran in process (TVM runtime): max abs error" in out.out
    assert "compiling with TVM for llvm" in out.err  # progress lines
    assert (out_dir / "manifest.json").is_file() and (out_dir / "model.so").is_file()
    assert main(["run", str(out_dir), "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "outputs [((2, 8), 'torch.float32')]" in out and "| artifact |" in out
    assert main(argv) == 2  # exists: refused, named
    assert "already exists" in capsys.readouterr().err


def test_export_int8_needs_calibration_and_takes_a_batches_function(tmp_path, capsys):
    model_file = _model_file(
        tmp_path,
        """
        import torch

        def make():
            relu = torch.nn.ReLU()
            return torch.nn.Sequential(torch.nn.Linear(8, 16), relu, torch.nn.Linear(16, 4))

        def batches():
            return [(torch.randn(2, 8),) for _ in range(4)]
    """,
    )
    argv = ["export", f"{model_file}:make", str(tmp_path / "a"), "--input", "2,8"]
    assert main([*argv, "--option", "quantize=int8"]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    calibrated = [*argv, "--option", "quantize=int8", "--calibration", f"{model_file}:batches"]
    assert main(calibrated) == 0
    assert "ran in onnxruntime (CPU)" in capsys.readouterr().out


def test_export_stablehlo_for_the_platforms_named_then_run_it(tmp_path, capsys):
    model_file = _model_file(
        tmp_path,
        """
        import torch

        def make():
            return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    """,
    )
    out_dir = tmp_path / "hlo"
    argv = ["export", f"{model_file}:make", str(out_dir), "--input", "2,8", "--format",
            "stablehlo"]  # fmt: skip
    assert main([*argv, "--platforms", "cpu,gpu"]) == 2
    assert "accepted values are one or more of ['cpu', 'tpu', 'cuda', 'rocm']" in (
        capsys.readouterr().err
    )
    assert main([*argv, "--platforms", "cpu,cuda"]) == 0
    assert "ran in JAX (XLA:CPU): max abs error" in capsys.readouterr().out
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["stablehlo"]["platforms"] == ["cpu", "cuda"]
    assert main(["run", str(out_dir), "--rounds", "2"]) == 0
    assert "| artifact |" in capsys.readouterr().out


def test_export_hls_project_with_options_then_run_its_csim(tmp_path, capsys):
    model_file = _model_file(
        tmp_path,
        """
        import torch

        def make():
            relu = torch.nn.ReLU()
            return torch.nn.Sequential(torch.nn.Linear(8, 16), relu, torch.nn.Linear(16, 4))
    """,
    )
    out_dir = tmp_path / "fpga"
    argv = ["export", f"{model_file}:make", str(out_dir), "--input", "2,8", "--format", "hls"]
    argv += ["--option", "quantize=int8", "--calibration", "random"]
    assert main([*argv, "--hls-option", "part=xc7z020clg400-1", "--hls-option", "io=stream"]) == 0
    out = capsys.readouterr()
    assert "FPGA estimates (xc7z020clg400-1, 5.0 ns)" in out.out
    assert "C simulation: 10 samples bit-exact with the int8 reference" in out.out  # 2 + 4 x 2
    assert "ran in C simulation (g++)" in out.out
    assert "#pragma HLS DATAFLOW" in (out_dir / "firmware" / "model.cpp").read_text()
    assert main(["run", str(out_dir), "--rounds", "2"]) == 0
    assert "outputs [((2, 4), 'torch.float32')]" in capsys.readouterr().out
    assert main([*argv, "--overwrite", "--hls-option", "reuse_factor=7"]) == 2
    assert "reuse factor 7 is not legal" in capsys.readouterr().err


def _model_file(tmp_path, source: str):
    """A model file for the command line (its factories are named in the tests' argv)."""
    path = tmp_path / "tiny_model.py"
    path.write_text(textwrap.dedent(source))
    return path
