"""The command line: help everywhere, exit code 2 with one clear line for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from workbench.cli import build_parser, main

SUBCOMMANDS = ["data", "model", "train", "evaluate", "predict", "pipeline", "app", "bench", "config"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_subcommand():
    out = _run("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("argv", [[s] for s in SUBCOMMANDS] + [["data", "build"], ["data", "describe"]])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: workbench" in capsys.readouterr().out


def test_console_script_entry_point_is_declared(repo):
    import tomllib

    scripts = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["workbench"] == "workbench.cli:main"
    assert build_parser().prog == "workbench"


def test_unknown_override_exits_2_naming_closest_key():
    out = _run("train", "--stage", "1", "foo=1")
    assert out.returncode == 2
    assert "foo" in out.stderr and "closest valid key" in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_typo_override_names_the_right_key(capsys):
    assert main(["config", "train.setps=3"]) == 2
    assert "'train.steps'" in capsys.readouterr().err


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "model.preset=tiny", "seed=5"]) == 0
    out = capsys.readouterr().out
    assert "seed: 5" in out and "preset: tiny" in out


def test_bad_usage_exits_2():
    assert _run("train").returncode == 2  # --stage is required
    assert _run("no-such-command").returncode == 2


def test_adapt_choices_are_the_ones_adapt_accepts():
    """The parser spells out `adapt`'s choices (importing workbench.adapt would load torchmetrics just to
    print --help): they must stay the lists adapt() checks."""
    from workbench.adapt import DATASETS, FEATURES

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["adapt"]
    choices = {a.dest: tuple(a.choices) for a in sub._actions if a.choices}
    assert choices["dataset"] == DATASETS and choices["features"] == FEATURES
