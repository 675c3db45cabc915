"""Waveform signal processing shared by the media decoder, the speech bank and the FSDD loader.

Every waveform the workbench trains on or predicts from goes through :func:`prepare_waveform`:
mono -> resampled to :data:`~workbench.modalities.SAMPLE_RATE` -> silence trimmed -> loudness
normalised. One path for synthetic, recorded and uploaded audio keeps them statistically alike.

The resampler is a band-limited (windowed-sinc) polyphase filter written in torch, because
torchaudio must not be installed here (it replaces the pinned CPU torch). For a rational ratio
``new/orig`` (reduced by their gcd) it builds ``new`` filters, one per output phase, and runs them
as a single strided ``conv1d``: output sample ``k*new + i`` is the dot product of filter ``i`` with
the input around position ``k*orig`` (computed as one matmul over ``unfold``-ed windows, which is
~100x faster on CPU than a single-channel strided ``conv1d``). The filter is a sinc with its cut-off at ``rolloff`` times
the lower Nyquist frequency, tapered by a Hann window ``zero_crossings`` lobes wide, i.e. the
classic Smith/JOS "bandlimited interpolation" design (as in torchaudio's ``sinc_interp_hann``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from workbench.errors import MediaError
from workbench.modalities import SAMPLE_RATE

TARGET_RMS = 0.1  # -20 dBFS: loudness every clip is normalised to
PEAK_LIMIT = 0.99  # after RMS normalisation, scale down further if a peak would clip
SILENCE_DB = -35.0  # frames this far below the loudest frame count as silence when trimming
SILENT_PEAK = 1e-3  # a waveform whose peak is below this (-60 dBFS) is treated as silence only
FRAME_SECONDS = 0.02  # energy frames for trimming
PAD_SECONDS = 0.03  # kept on both sides of the detected speech


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, zero_crossings: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc filters: ((K, new) float32, half-width in input samples)."""
    cutoff = min(orig, new) * rolloff  # in "reduced rate" units; the filter's cut-off frequency
    width = math.ceil(zero_crossings * orig / cutoff)  # half-length of each filter, in input samples
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None] / orig  # (1, K) input positions
    phase = -torch.arange(new, dtype=torch.float64)[:, None] / new  # (new, 1) output phase offsets
    t = (phase + idx) * cutoff  # (new, K) time in units of the cut-off period
    t = t.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2  # Hann taper over the kernel support
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernel = sinc * window * (cutoff / orig)  # unit DC gain
    return kernel.to(torch.float32).T.contiguous(), width  # (K, new)


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int = SAMPLE_RATE, *,
             zero_crossings: int = 16, rolloff: float = 0.945) -> torch.Tensor:  # fmt: skip
    """Band-limited resampling of ``wave`` (..., L) from ``orig_rate`` to ``new_rate`` Hz.

    The output has ``ceil(L * new / orig)`` samples. Frequencies above ``rolloff`` times the lower
    Nyquist frequency are removed (no aliasing when downsampling, no imaging when upsampling).
    """
    orig_rate, new_rate = int(orig_rate), int(new_rate)
    if orig_rate == new_rate:
        return wave
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    kernel, width = _sinc_kernel(orig, new, zero_crossings, rolloff)
    shape, length = wave.shape[:-1], wave.shape[-1]
    x = wave.reshape(-1, length).to(torch.float32)  # (B, L)
    x = F.pad(x, (width, width + orig))
    windows = x.unfold(-1, kernel.shape[0], orig).contiguous()  # (B, frames, K): input around k*orig
    y = (windows.reshape(-1, kernel.shape[0]) @ kernel).reshape(x.shape[0], -1)  # (B, frames * new)
    out_len = math.ceil(new * length / orig)
    return y[:, :out_len].reshape(*shape, out_len)


def to_mono(wave: np.ndarray) -> np.ndarray:
    """(L,) or (L, C) samples -> (L,) float32, channels averaged."""
    wave = np.asarray(wave, dtype=np.float32)
    return wave.mean(axis=1) if wave.ndim == 2 else wave.reshape(-1)


def trim_silence(wave: torch.Tensor, rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Cut leading and trailing silence: frames more than 35 dB below the loudest frame.

    Raises MediaError if nothing is louder than -60 dBFS (silence only).
    """
    if wave.numel() == 0 or float(wave.abs().max()) < SILENT_PEAK:
        raise MediaError("the audio is silent (nothing louder than -60 dBFS): record the digit again")
    frame = max(1, int(FRAME_SECONDS * rate))
    n = math.ceil(wave.numel() / frame)
    frames = F.pad(wave, (0, n * frame - wave.numel())).reshape(n, frame)  # (n, frame)
    rms = frames.pow(2).mean(1).sqrt()
    loud = torch.nonzero(rms >= rms.max() * 10 ** (SILENCE_DB / 20)).flatten()
    pad = int(PAD_SECONDS * rate)
    start = max(0, int(loud[0]) * frame - pad)
    stop = min(wave.numel(), (int(loud[-1]) + 1) * frame + pad)
    return wave[start:stop]


def normalise_loudness(wave: torch.Tensor) -> torch.Tensor:
    """Scale to :data:`TARGET_RMS`, then down again if a peak would exceed :data:`PEAK_LIMIT`."""
    rms = float(wave.pow(2).mean().sqrt())
    if rms <= 0:
        raise MediaError("the audio is silent: record the digit again")
    wave = wave * (TARGET_RMS / rms)
    peak = float(wave.abs().max())
    return wave * (PEAK_LIMIT / peak) if peak > PEAK_LIMIT else wave


def prepare_waveform(samples: np.ndarray | torch.Tensor, rate: int) -> torch.Tensor:
    """Decoded samples (L,) or (L, C) at ``rate`` -> float32 (L',) mono, 16 kHz, trimmed, normalised."""
    if isinstance(samples, torch.Tensor):
        samples = samples.numpy()
    mono = to_mono(samples)
    if not np.isfinite(mono).all():
        raise MediaError("the audio contains invalid (NaN or infinite) samples")
    wave = resample(torch.from_numpy(np.ascontiguousarray(mono)), rate, SAMPLE_RATE)
    return normalise_loudness(trim_silence(wave))


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: thousands of tiny per-clip ops are ~10x slower with two threads
    when other processes share the cores (OpenMP threads spin waiting for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def to_int16(wave: torch.Tensor) -> torch.Tensor:
    """float waveform in [-1, 1] -> int16 (for compact caches)."""
    return (wave.clamp(-1, 1) * 32767).round().to(torch.int16)
