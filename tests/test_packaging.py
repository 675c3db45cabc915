"""Set-up stays reproducible: environment.yml matches pyproject.toml; torch is pinned exactly; uv installs
from the package sources pip is configured with."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

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


def _uv_args(repo):
    spec = importlib.util.spec_from_file_location("uv_args", repo / "tools" / "uv_args.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.uv_args


def test_uv_gets_pip_package_sources_with_pip_precedence(repo):
    uv_args = _uv_args(repo)
    listing = "\n".join([
        ":env:.default-timeout='180'",
        ":env:.find-links='/opt/wheels'",
        "global.find-links='/srv/old-wheels'",  # the environment overrides the config files, as in pip
        "global.index-url='https://mirror.example/simple'",
        "install.index-url='https://install.example/simple'",  # the install section overrides global
        "global.extra-index-url='file:///opt/pypi/simple file:///opt/more/simple'",  # a list: one flag each
        "global.constraint='/etc/pip/constraints.txt'",
        "global.cert='/etc/ssl/certs/ca.crt'",  # not a package source: not handed over
    ])  # fmt: skip
    assert uv_args(listing) == [
        "--find-links", "/opt/wheels",
        "--index-url", "https://install.example/simple",
        "--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/more/simple",
        "--constraint", "/etc/pip/constraints.txt",
        "--index-strategy", "unsafe-best-match",  # pip's choice: the best version across every index
    ]  # fmt: skip
    assert uv_args("global.find-links='/opt/wheels'") == ["--find-links", "/opt/wheels"]
    assert uv_args("") == []  # nothing configured: uv's defaults, which are pip's (PyPI)
    # the script runs on the bare interpreter (nothing installed yet) and prints one line of shell words
    done = subprocess.run([sys.executable, "-I", str(repo / "tools" / "uv_args.py")], capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert done.stdout.count("\n") == 1 and not done.stderr


def test_make_setup_installs_with_uv_and_falls_back_to_pip(repo):
    recipe = (repo / "Makefile").read_text()
    assert "uv pip install" in recipe and "$$($(PY) tools/uv_args.py)" in recipe
    assert "|| $(PY) -m pip install" in recipe
