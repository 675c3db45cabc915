"""What the machine can do fast, asked once: the one place that decides ``train.mixed_precision=auto``.

bf16 autocast pays only where the hardware multiplies bf16 natively: CUDA devices with bf16 support,
and CPUs with AVX-512-BF16 or AMX tiles. Elsewhere PyTorch emulates it. On an AVX2-only EPYC we
measured a 2048^2 GEMM at 0.27 GFLOP/s in bf16 against 59 GFLOP/s in fp32 (a 200x slowdown; a training
step ran 20x slower), so ``auto`` must fall back to fp32 there rather than follow a fixed default.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@functools.cache
def native_bf16() -> bool:
    """True when bf16 matmuls run natively on the device training will use."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, present since torch 2.1
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(requested: str) -> str:
    """``auto`` -> ``bf16`` on native-bf16 hardware, else ``no``; explicit choices are kept."""
    if requested != "auto":
        return requested
    return "bf16" if native_bf16() else "no"


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(n)`` (None: as is), then restore the previous count.

    Small networks on a shared 2-core machine are fastest on one thread: with other jobs keeping both
    cores busy, a `tiny` step took 0.13 s on one thread and 1.6 s on two (OpenMP's second thread
    spin-waits for a core).
    """
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
