"""Timing, FLOP counting and machine facts shared by every benchmark section.

Every figure is a :func:`stat`: the median of repeated runs after warm-up, with min, max and the number
of runs. :func:`measure` repeats until it has ``repeats`` runs or ``budget_s`` is spent (never fewer than
``min_repeats``), so a slow shape on a slow machine cannot stall the suite. :func:`measure_interleaved`
times several candidates in turn inside each repeat, so peers compared "in the same run" also see the
same machine load.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils import flop_counter

from workbench.hardware import torch_threads

aten = torch.ops.aten


# ----------------------------------------------------------------------------------------- statistics
def _sig(v: float, digits: int = 5) -> float:
    """``v`` to ``digits`` significant figures: a 19 ms step keeps its precision, unlike 4 decimals."""
    return float(f"{float(v):.{digits}g}")


def stat(values: list[float], unit: str, digits: int = 5) -> dict[str, Any]:
    """``{"median", "min", "max", "n", "unit"}`` of repeated measurements (``digits`` significant)."""
    if not values:
        raise ValueError("no measurements")
    r = lambda v: _sig(v, digits)  # noqa: E731
    return {
        "median": r(statistics.median(values)),
        "min": r(min(values)),
        "max": r(max(values)),
        "n": len(values),
        "unit": unit,
    }


def percentiles(values_ms: list[float]) -> dict[str, Any]:
    """Latency summary: p50/p95/p99 (nearest rank), min, max, n, in milliseconds."""
    v = sorted(values_ms)
    rank = lambda q: v[min(len(v) - 1, max(0, round(q * len(v)) - 1))]  # noqa: E731
    return {
        "p50": round(statistics.median(v), 3),
        "p95": round(rank(0.95), 3),
        "p99": round(rank(0.99), 3),
        "min": round(v[0], 3),
        "max": round(v[-1], 3),
        "n": len(v),
        "unit": "ms",
    }


def scaled(s: dict[str, Any], factor: float, unit: str, invert: bool = False) -> dict[str, Any]:
    """A stat of seconds turned into a rate (``invert``: factor / seconds; min and max swap) or a multiple."""
    if invert:
        lo, hi = factor / s["max"], factor / s["min"]
        mid = factor / s["median"]
    else:
        lo, hi, mid = s["min"] * factor, s["max"] * factor, s["median"] * factor
    return {
        "median": _sig(mid),
        "min": _sig(lo),
        "max": _sig(hi),
        "n": s["n"],
        "unit": unit,
    }


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Ratio of two stats' medians."""
    return round(a["median"] / b["median"], 3)


# ------------------------------------------------------------------------------------------- timing
def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float = float("inf"),
    min_repeats: int = 3,
) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls: ``repeats`` runs, fewer once ``budget_s`` is
    spent (but at least ``min_repeats``)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats:
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
        if len(times) >= min(min_repeats, repeats) and time.perf_counter() - start > budget_s:
            break
    return times


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float = float("inf"),
    min_repeats: int = 3,
) -> dict[str, list[float]]:
    """Like :func:`measure` for several candidates, one call of each per repeat (same load for all)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for i in range(repeats):
        for name, fn in fns.items():
            tic = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - tic)
        if i + 1 >= min(min_repeats, repeats) and time.perf_counter() - start > budget_s:
            break
    return times


threads = torch_threads  # the one definition lives in workbench.hardware


# ---------------------------------------------------------------------------------------- FLOPs
# torch.utils.flop_counter counts the CUDA attention kernels but not the CPU one that
# F.scaled_dot_product_attention dispatches to, so attention would silently count as 0 FLOPs.
def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kw
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}
ATTENTION_OPS = ("_scaled_dot_product", "bmm", "baddbmm")  # attention's share: fused kernel or explicit path


def count_flops(fn: Callable[[], Any]) -> dict[str, Any]:
    """Matmul/attention FLOPs of one call of ``fn`` (forward and backward, optimiser excluded: it is
    elementwise), and the share spent in attention (the ``q k^T`` and ``att v`` products)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    per_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    total = counter.get_total_flops()
    attention = sum(n for op, n in per_op.items() if any(a in op for a in ATTENTION_OPS))
    return {"flops": int(total), "attention_share": round(attention / total, 4) if total else 0.0}


# -------------------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was."""
    from workbench.hardware import native_bf16
    from workbench.report.index import machine_info

    info = machine_info()
    info.update(
        cpu=cpu_model(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        native_bf16=native_bf16(),
        torch_threads_default=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset (libgomp spins, then sleeps)"),
        load_average_start=load_average(),
    )
    return info
