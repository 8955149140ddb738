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
    model_file = tmp_path / "tiny_model.py"
    model_file.write_text(
        textwrap.dedent("""
        import torch

        def make():
            return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    """)
    )
    assert main(["bench", f"{model_file}:make", "--input", "2,8", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "outputs match eager" in out
    assert "| graphopt |" in out and "fold_constants" in out


def test_bench_int8_calibrates_and_reports_its_error(tmp_path, capsys):
    model_file = tmp_path / "tiny_model.py"
    model_file.write_text(
        "import torch\n\ndef make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), "
        "torch.nn.Linear(16, 4))\n"
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
