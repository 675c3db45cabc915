"""Where the workbench keeps things on disk: the data cache, runs and reports."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(configured: str = "") -> Path:
    """The data cache: ``data.cache_dir`` if set, else ``$WORKBENCH_CACHE``, else ``~/.cache/workbench``."""
    root = configured or os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "workbench"
    return Path(root).expanduser()


def runs_dir() -> Path:
    """Training runs: ``$WORKBENCH_RUNS`` or ``./runs``."""
    return Path(os.environ.get("WORKBENCH_RUNS", "runs")).expanduser()


def reports_dir() -> Path:
    """Notebook reports: ``$WORKBENCH_REPORTS`` or ``./reports``."""
    return Path(os.environ.get("WORKBENCH_REPORTS", "reports")).expanduser()


def latest_checkpoint(root: Path | None = None) -> Path | None:
    """The most recently written ``runs/*/checkpoint`` directory, or None."""
    root = root or runs_dir()
    found = [p for p in root.glob("*/checkpoint") if (p / "model.safetensors").is_file()]
    return max(found, key=lambda p: (p / "model.safetensors").stat().st_mtime) if found else None
