"""The `cbtlab` command: its quick subcommands, and that `--help` loads no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cbtlab.cli import COMMANDS, main
from cbtlab.config import ExperimentConfig


def test_help_and_where_load_neither_torch_nor_ray() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from cbtlab.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    main(['where'])\n"
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'timm') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_config_prints_the_overridden_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "model.depth=6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = ExperimentConfig().with_overrides({"model.depth": 6}).flat()
    assert lines == [f"{key} = {value}" for key, value in expected.items()]


def test_a_bad_override_names_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["config", "--set", "model.attention=nope"])
    assert stop.value.code == 2
    assert "model.attention" in capsys.readouterr().err


def test_where_names_every_place(capsys: pytest.CaptureFixture[str], tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CBTLAB_HOME", str(tmp_path))
    assert main(["where"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out.splitlines()[0]
    assert [line.split()[0] for line in out.splitlines()] == ["home", "data", "MLflow", "Ray"]


def test_help_lists_every_command_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for group, commands in COMMANDS.items():
        for name, command in commands.items():
            title = f"{group} {name}".strip()
            assert f"  {title:<18}{command.summary}" in out, title
            assert f"e.g. {command.example}" in out, title
            assert command.example.startswith(f"cbtlab {title}"), (title, command.example)


@pytest.mark.parametrize(
    "words", [[group, *([name] if name else [])] for group in COMMANDS for name in COMMANDS[group]]
)
def test_every_command_answers_its_help(words: list[str], capsys) -> None:
    # Each command's own parser, under its `cbtlab ...` name: the function is found and takes
    # (argv, prog).
    with pytest.raises(SystemExit) as stop:
        main([*words, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: cbtlab {' '.join(words)} ")


def test_a_mistyped_command_names_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stdy"]) == 2
    assert "'stdy' is not a command; did you mean 'study'?" in capsys.readouterr().err
    assert main(["study", "reprodce"]) == 2
    assert "did you mean 'reproduce'?" in capsys.readouterr().err
    assert main(["study"]) == 2  # a group alone: its commands
    assert "study rep-count" in capsys.readouterr().out


def test_resume_without_a_study_says_what_it_expected(tmp_path, capsys) -> None:
    assert main(["study", "resume", str(tmp_path)]) == 1
    assert "expected cbtlab_study.json" in capsys.readouterr().err


def test_train_refuses_a_nan_learning_rate_before_ray(capsys: pytest.CaptureFixture[str]) -> None:
    """`cbtlab train --set train.lr=nan` stops at the config, naming the field: before, the
    workers failed in the optimiser and Ray retried them for a minute, ending in a traceback."""
    with pytest.raises(SystemExit) as stop:
        main(["train", "--set", "train.lr=nan"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "train.lr: must be a finite number, got nan" in err
    assert "Traceback" not in err
