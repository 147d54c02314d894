"""The command lines agree: each builds its parser in parse_args, takes the same --checkpoint (none given: the
shipped one, or with --model random weights) and answers a bad input with one line and exit code 2."""

import importlib

import pytest

import vggattn
from vggattn.models.checkpoint import BAD_INPUT

WITH_CHECKPOINT = ["app", "training.evaluate", "explain", "study"]
MINIMAL = {"app": [], "training.evaluate": [], "explain": ["x.jpg", "--out", "o"], "study": ["--data", "d", "--out", "o"]}


@pytest.mark.parametrize("name", WITH_CHECKPOINT)
def test_checkpoint_flag_is_the_same_everywhere(name):
    module = importlib.import_module(f"vggattn.{name}")
    args = module.parse_args(MINIMAL[name])
    assert args.checkpoint is None  # one meaning: not given (the shipped checkpoint, or --model's random weights)


@pytest.mark.parametrize("name", WITH_CHECKPOINT)
def test_checkpoint_help_names_the_shipped_default(name, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(f"vggattn.{name}").parse_args(["--help"])
    assert vggattn.DEFAULT_CHECKPOINT.name in "".join(capsys.readouterr().out.split())  # (wrapped at its hyphens)


@pytest.mark.parametrize("name", WITH_CHECKPOINT)
def test_a_missing_checkpoint_is_exit_2(name, tmp_path, monkeypatch, caplog, capsys):
    module = importlib.import_module(f"vggattn.{name}")
    if name == "app":  # never serve: the checkpoint fails before
        monkeypatch.setattr(module, "launch", lambda *a, **k: pytest.fail("served a missing checkpoint"))
    argv = [a.replace("d", str(tmp_path)) if a == "d" else a for a in MINIMAL[name]]
    code = module.main([*argv, "--checkpoint", str(tmp_path / "nope.safetensors")])
    assert code == BAD_INPUT == 2
    said = caplog.text + capsys.readouterr().err
    assert "nope.safetensors" in said and "Traceback" not in said


def test_train_and_plots_say_bad_input_with_exit_2(tmp_path, caplog):
    from vggattn.training import plots, train

    assert train.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")]) == 2
    assert plots.main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "g.png")]) == 2
    assert "missing.jsonl" in caplog.text and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("name", ["training.train", "training.evaluate", "explain", "study", "training.plots", "app"])
def test_every_cli_builds_its_parser_in_parse_args_and_argparse_errors_are_2(name):
    module = importlib.import_module(f"vggattn.{name}")
    assert callable(module.parse_args) and callable(module.main)
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--no-such-flag"])
    assert e.value.code == 2


COMMANDS = ["app", "explain", "study", "train", "evaluate", "plots"]  # vggattn.launcher's, one a console script


@pytest.mark.parametrize("how", ["import", "help", "bad flag"])
def test_import_and_help_load_no_torch(how):
    """`import vggattn` and every command's --help (and a bad flag) load neither torch nor Gradio: a fresh
    interpreter, then sys.modules. (The times are measured in bench/README.md; this says why they are short.)"""
    import subprocess
    import sys

    run = {"import": "import vggattn",
           "help": "from vggattn import launcher\nfor c in %r:\n try: getattr(launcher, c)(['--help'])\n"
                   " except SystemExit as e: assert e.code == 0, c" % COMMANDS,
           "bad flag": "from vggattn import launcher\nfor c in %r:\n try: getattr(launcher, c)(['--no-such-flag'])\n"
                       " except SystemExit as e: assert e.code == 2, c" % COMMANDS}[how]
    out = subprocess.run([sys.executable, "-c", run + "\nimport sys\nprint(sorted({m.split('.')[0] for m in "
                          "sys.modules} & {'torch', 'gradio', 'numpy', 'matplotlib', 'timm', 'transformers'}))"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-300:]


@pytest.mark.parametrize("module", ["explain", "training.train", "training.evaluate", "training.plots"])
def test_python_dash_m_answers_help_before_its_imports(module):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-X", "importtime", "-m", f"vggattn.{module}", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: vggattn-"), out.stderr[-500:]
    assert "| torch\n" not in out.stderr  # -X importtime lists every module imported, on stderr
