"""Print the arguments that point `uv pip install` at the package sources pip is configured with.

`make setup` installs the project with uv (~20 s against pip's 60 s here), but uv reads neither pip's
config files nor its ``PIP_*`` variables. This script hands them over, read from ``pip config list``
(files and environment alike): ``find-links`` (on this machine a local CPU torch wheel), ``index-url``,
``extra-index-url`` and ``constraint``. Where pip has more than one index, uv is told to pick the best
version across all of them, as pip does (uv's default takes every version of a package from the first
index that has it). Standard library only: it runs before anything is installed.

    python tools/uv_args.py          # e.g. --find-links /opt/wheels --constraint /etc/pip/c.txt
"""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys

FLAGS = {
    "find-links": "--find-links",
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "constraint": "--constraint",
}
# pip's precedence: environment variables over the ``install`` command's section over ``global``
SECTIONS = (":env:", "install", "global")


def uv_args(listing: str) -> list[str]:
    """uv's arguments for a ``pip config list`` output (lines ``section.key='value'``)."""
    found: dict[str, dict[str, list[str]]] = {}
    for line in listing.splitlines():
        name, sep, raw = line.partition("=")
        section, _, key = name.rpartition(".")
        if not sep or key not in FLAGS or section not in SECTIONS:
            continue
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        found.setdefault(key, {})[section] = str(value).split()  # pip's lists are whitespace-separated
    args: list[str] = []
    for key, flag in FLAGS.items():
        by_section = found.get(key, {})
        values = next((by_section[s] for s in SECTIONS if s in by_section), [])
        if key == "index-url":
            values = values[:1]
        for value in dict.fromkeys(values):
            args += [flag, value]
    if "extra-index-url" in found:
        args += ["--index-strategy", "unsafe-best-match"]
    return args


def main() -> int:
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    print(shlex.join(uv_args(listing)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
