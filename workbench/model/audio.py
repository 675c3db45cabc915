"""Log-mel spectrograms in plain torch (no torchaudio): STFT with a Hann window, a mel filterbank, log.

Conventions (all standard, written down so the numbers can be checked by hand):

* STFT: ``torch.stft`` with ``n_fft`` samples, a periodic Hann window of the same length, ``hop``
  samples between frames, ``center=True`` with zero padding (``pad_mode="constant"``). Frame ``k`` is
  centred on sample ``k * hop``; a waveform of ``n`` samples has ``1 + n // hop`` frames. Zero padding
  on the right therefore leaves the first ``1 + n // hop`` frames of a row unchanged: a clip gives the
  same spectrogram alone as inside a padded batch.
* Mel scale: HTK, ``mel = 2595 log10(1 + f / 700)``. ``n_mels`` triangular filters with centres
  equally spaced in mel between ``f_min`` and ``f_max`` (edges at the neighbouring centres), evaluated
  at the FFT bin frequencies, peak 1, no area normalisation. Between the first and last centre the
  filters form a partition of unity (each FFT bin's weights sum to 1).
* Log: ``log(mel power + 1e-10)``, floored at 80 dB below the row's maximum (librosa's ``top_db``),
  then normalised per utterance to zero mean and unit variance over the valid frames (loudness and
  recording level do not matter). Frames beyond a row's length are set to 0 after normalisation.
* ``per_bin=True`` (``model.audio_norm=bin_mean``): each mel bin's mean over the valid frames is
  subtracted before the utterance-wide scaling, i.e. cepstral mean normalisation in the log-mel
  domain (Atal 1974): a fixed linear filter on the waveform (a microphone, a room's colouring, a
  voice's long-term spectral envelope) adds a constant to each bin's log power, and that constant
  is removed. The frames' relative dynamics across bins are kept (one scale for the whole clip).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TOP_DB = 80.0
_LN_TOP = TOP_DB / 10.0 * math.log(10.0)  # 80 dB of power in natural-log units


def hz_to_mel(f: Tensor | float) -> Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None):
    """(n_mels, n_fft // 2 + 1) float32 triangular filters; also returns their centre frequencies (Hz)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # FFT bin frequencies
    edges = mel_to_hz(
        torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2, dtype=torch.float64)
    )
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    rising = (bins[None] - lo) / (mid - lo)
    falling = (hi - bins[None]) / (hi - mid)
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)  # (n_mels, n_freq)
    return fb.float(), edges[1:-1].float()


def frames_for(n_samples: Tensor | int, hop: int) -> Tensor | int:
    """Number of STFT frames of a waveform of ``n_samples`` (center=True)."""
    return 1 + n_samples // hop


def log_mel(
    wave: Tensor, lengths: Tensor, window: Tensor, fb: Tensor, n_fft: int, hop: int, per_bin: bool = False
) -> Tensor:
    """wave (B, L) float, lengths (B,) samples -> normalised log-mel (B, frames, n_mels), float32.

    Runs in float32 with autocast disabled (FFT and logs are not bf16-safe).
    """
    with torch.autocast(device_type=wave.device.type, enabled=False):
        wave = wave.float()
        spec = torch.stft(
            wave, n_fft, hop_length=hop, window=window, center=True, pad_mode="constant", return_complex=True
        )  # (B, n_freq, T)
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(fb, power).transpose(1, 2)  # (B, T, n_mels)
        logmel = torch.log(mel + 1e-10)
        T = logmel.shape[1]
        valid = torch.arange(T, device=wave.device)[None] < frames_for(lengths, hop)[:, None]  # (B, T)
        v = valid.unsqueeze(-1).float()  # (B, T, 1)
        top = logmel.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(dim=(1, 2), keepdim=True)
        logmel = torch.maximum(logmel, top - _LN_TOP)
        count = v.sum(dim=(1, 2), keepdim=True) * logmel.shape[2]
        if per_bin:  # (B, 1, n_mels): each bin's mean over the clip's frames
            mean = (logmel * v).sum(dim=1, keepdim=True) / v.sum(dim=1, keepdim=True)
        else:
            mean = (logmel * v).sum(dim=(1, 2), keepdim=True) / count
        var = (((logmel - mean) * v) ** 2).sum(dim=(1, 2), keepdim=True) / count
        return (logmel - mean) / torch.sqrt(var + 1e-5) * v  # padding frames -> 0
