"""One ``seed`` drives Python, NumPy and torch; opt-in deterministic algorithms for exact replays."""

from __future__ import annotations

import os
import random

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
