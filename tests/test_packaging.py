"""Set-up stays reproducible: environment.yml matches pyproject.toml; torch is pinned exactly."""

from __future__ import annotations

import json
import re

import tomllib
import yaml


def _pyproject(repo) -> dict:
    return tomllib.loads((repo / "pyproject.toml").read_text())


def test_environment_yml_matches_pyproject(repo):
    project = _pyproject(repo)["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    env = yaml.safe_load((repo / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(pip) == sorted(wanted)


def test_torch_is_pinned_exactly(repo):
    deps = _pyproject(repo)["project"]["dependencies"]
    assert "torch==2.13.0" in deps
    banned = re.compile(r"^(torchvision|torchaudio|timm|vit-pytorch)\b")
    everything = deps + _pyproject(repo)["project"]["optional-dependencies"]["dev"]
    assert not [d for d in everything if banned.match(d)]


def test_notebooks_are_committed_without_outputs(repo):
    for nb in (repo / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        for cell in cells:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs"), f"{nb.name} has outputs"
                assert cell.get("execution_count") is None, f"{nb.name} has execution counts"


def test_ci_runs_make_test(repo):
    assert "make test" in (repo / ".ci" / "run").read_text()
