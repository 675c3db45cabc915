"""Shared fixtures. Tests run on 2 CPU cores: keep torch to the cores we have and fix seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FSDD_DIR = SHARED / "data" / "fsdd"

# Under pytest-xdist (`make test` runs two workers) the workers share the cores: one thread each, as
# oversubscribed OpenMP threads spin-wait and run many times slower. Set before torch is imported.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, (os.cpu_count() or 1) // _WORKERS))))


# Seconds each slow file takes alone (quiet 2-core machine). `make test` runs files on two xdist workers
# (`--dist loadfile --no-loadscope-reorder`: a file stays on one worker, files start in this order), so
# the longest go first and the short ones fill in behind them instead of trailing at the end.
FILE_SECONDS = {
    "test_pipeline_notebooks.py": 120,
    "test_train.py": 80,
    "test_reliability.py": 75,
    "test_app.py": 65,
    "test_moe.py": 45,
    "test_deepsense.py": 40,
    "test_fusion.py": 30,
    "test_bench.py": 30,
    "test_pipeline.py": 30,
    "test_adapt.py": 30,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: order within a file kept


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
