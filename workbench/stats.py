"""Summaries over seeds shared by the studies (Table 12, fusion, IMP, DeepSense) and their notebooks."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def mean_spread(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over seeds; the spread of one value is 0.

    Values may be floats, NumPy scalars or 0-d tensors.
    """
    v = np.asarray([float(x.item() if hasattr(x, "item") else x) for x in values], dtype=float)
    if v.size == 0:
        raise ValueError("mean_spread: no values")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def format_mean_spread(values: Iterable[float], scale: float = 1.0, digits: int = 1) -> str:
    """``"85.3 ± 1.2"`` (or ``"85.3"`` for a single seed); ``scale=100`` turns fractions into percent."""
    values = list(values)
    mean, std = mean_spread(values)
    text = f"{mean * scale:.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if len(values) > 1 else text
