"""One ``seed`` drives Python, NumPy and torch; opt-in deterministic algorithms for exact replays."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> torch.Generator:
    """Seed every RNG the workbench touches and return a torch Generator seeded the same way.

    ``deterministic=True`` also asks torch for deterministic kernels (slower on GPUs, a no-op for
    most CPU ops) so that two runs with the same seed give bit-identical weights.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return generator(seed)


def generator(seed: int) -> torch.Generator:
    """A fresh CPU torch.Generator: pass it to samplers so data order does not depend on model init."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def rng_state() -> dict:
    """Snapshot of the Python, NumPy and torch RNG states (for exact resume)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def runs_per_seed(
    cfg: Any,
    names: Iterable[str],
    seeds: Iterable[int],
    out: str | Path,
    run: Callable[[Any, str, Path], Any],
    cached: Callable[[dict], Any] = lambda record: record,
) -> dict[str, dict[int, Any]]:
    """``{name: {seed: value}}`` for a study's (name, seed) grid, each run in ``out/<name>/seed<k>/``.

    ``run(cfg with seed k, name, run_dir)`` trains one; a run whose ``result.json`` already exists is
    not repeated (an interrupted study resumes), its value is ``cached(record)`` instead.
    """
    from workbench.config import from_dict, to_dict

    seeds = list(seeds)
    results: dict[str, dict[int, Any]] = {}
    for name in names:
        for seed in seeds:
            run_dir = Path(out) / name / f"seed{seed}"
            done = run_dir / "result.json"
            if done.is_file():
                value = cached(json.loads(done.read_text()))
            else:
                value = run(from_dict(to_dict(cfg) | {"seed": seed}), name, run_dir)
            results.setdefault(name, {})[seed] = value
    return results
