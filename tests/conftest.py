"""Shared fixtures. Tests run on 2 CPU cores: keep torch to the cores we have and fix seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FSDD_DIR = SHARED / "data" / "fsdd"

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def fsdd_dir() -> Path:
    if not (FSDD_DIR / "recordings").is_dir():
        pytest.fail(
            f"the shared FSDD recordings are missing at {FSDD_DIR}; CI provides ../shared beside the repo"
        )
    return FSDD_DIR
