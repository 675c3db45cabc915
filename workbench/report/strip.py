"""Clear notebooks' outputs before committing (what nbstripout does, without the git filter).

    python -m workbench.report.strip                 # every notebooks/*.ipynb, in place
    python -m workbench.report.strip --check FILE..  # exit 1 and list the files that need stripping

Besides outputs and execution counts this drops papermill's traces (injected-parameters and error
cells, run metadata) and stored widget state, and names the ``workbench`` kernel (``make lab``
registers it) so JupyterLab opens the notebooks with the project's interpreter.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

KERNELSPEC = {"name": "workbench", "display_name": "Python (workbench)", "language": "python"}
_PAPERMILL_CELL_TAGS = {"injected-parameters", "papermill-error-cell-tag"}
_CELL_METADATA_DROPPED = ("execution", "papermill", "ExecuteTime", "collapsed", "scrolled")
_NB_METADATA_DROPPED = ("papermill", "widgets")


def _strip(nb) -> None:
    nb.cells = [c for c in nb.cells if not _PAPERMILL_CELL_TAGS & set(c.get("metadata", {}).get("tags", []))]
    for cell in nb.cells:
        for key in _CELL_METADATA_DROPPED:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    for key in _NB_METADATA_DROPPED:
        nb.metadata.pop(key, None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)


def strip_outputs(path: str | Path, check: bool = False) -> bool:
    """Strip ``path`` in place (unless ``check``); return True if it had anything to strip."""
    import nbformat

    path = Path(path)
    before = path.read_text(encoding="utf-8")
    nb = nbformat.reads(before, as_version=4)
    _strip(nb)
    after = nbformat.writes(nb) + "\n"
    changed = after != before
    if changed and not check:
        path.write_text(after, encoding="utf-8")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workbench.report.strip", description=__doc__.split("\n")[0]
    )
    parser.add_argument("paths", nargs="*", help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any needs stripping")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.paths] or sorted(Path("notebooks").glob("*.ipynb"))
    changed = [p for p in paths if strip_outputs(p, check=args.check)]
    for p in changed:
        print(f"{'needs stripping' if args.check else 'stripped'}: {p}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
