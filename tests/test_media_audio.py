"""Waveform processing (resampler, trimming, loudness) and the eSpeak NG synthesizer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench.data import speech
from workbench.data.audio import normalise_loudness, prepare_waveform, resample, trim_silence
from workbench.errors import MediaError
from workbench.modalities import SAMPLE_RATE


def _tone(freq: float, rate: int, seconds: float = 1.0) -> torch.Tensor:
    return torch.sin(
        2 * math.pi * freq * torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    ).float()


@pytest.mark.parametrize(("orig", "new", "freq"), [(22_050, 16_000, 1000.0), (8_000, 16_000, 440.0),
                                                   (44_100, 16_000, 3000.0), (48_000, 16_000, 6000.0),
                                                   (16_000, 22_050, 5000.0), (11_025, 16_000, 100.0)])  # fmt: skip
def test_resample_matches_the_analytic_tone(orig, new, freq):
    y = resample(_tone(freq, orig), orig, new)
    assert y.numel() == new  # ceil(L * new / orig) for one second
    ref = _tone(freq, new)
    inner = slice(200, -200)  # away from the zero-padded edges
    assert float((y[inner] - ref[inner]).abs().max()) < 3e-3


def test_resample_removes_what_the_new_rate_cannot_hold():
    y = resample(_tone(10_000.0, 44_100), 44_100, 16_000)  # 10 kHz is above the new 8 kHz Nyquist
    assert float(y[200:-200].pow(2).mean().sqrt()) < 1e-2  # aliased energy < -37 dB of the tone's 0.707


def test_resample_shapes_and_identity():
    x = torch.randn(2, 3, 1000)
    assert resample(x, 8000, 16000).shape == (2, 3, 2000)
    assert resample(x, 16000, 16000) is x
    assert resample(torch.randn(5), 22050, 16000).shape == (4,)


def test_trim_and_normalise():
    word = 0.3 * _tone(300.0, SAMPLE_RATE, 0.5)
    padded = torch.cat([torch.zeros(SAMPLE_RATE), word, 1e-5 * torch.randn(SAMPLE_RATE)])
    trimmed = trim_silence(padded)
    assert 0.5 <= trimmed.numel() / SAMPLE_RATE <= 0.5 + 2 * 0.03 + 0.02 + 1e-9
    out = normalise_loudness(trimmed)
    assert abs(float(out.pow(2).mean().sqrt()) - 0.1) < 1e-4
    spike = torch.zeros(1000)
    spike[500] = 0.5
    assert float(normalise_loudness(spike).abs().max()) <= 0.99 + 1e-6  # peak limit wins over RMS target
    with pytest.raises(MediaError, match="silent"):
        trim_silence(torch.zeros(16000))
    with pytest.raises(MediaError, match="invalid"):
        prepare_waveform(np.array([0.1, np.nan, 0.2], dtype=np.float32), 16000)


def test_espeak_is_deterministic_and_speaks():
    a, rate = speech.synthesize("sieben", "de+f3", rate=150, pitch=40)
    speech.synthesize("bonjour tout le monde", "fr+klatt")  # state left behind by another clip
    b, _ = speech.synthesize("sieben", "de+f3", rate=150, pitch=40)
    assert rate == 22_050 and a.dtype == np.int16
    assert np.array_equal(a, b)
    assert 0.2 < len(a) / rate < 1.5 and np.abs(a).max() > 3000
    slow, _ = speech.synthesize("sieben", "de+f3", rate=90, pitch=40)
    assert len(slow) > 1.3 * len(a)  # the rate parameter reaches the synthesizer


def test_every_voice_variant_exists_in_every_language():
    for language in speech.ESPEAK_VOICES:
        with speech.Session(speech.voice_name(language, "m1")) as tts:
            assert tts.say("1").size > 0
    for variant, _ in speech.VOICE_VARIANTS:  # one session per variant, cheap: ~5 ms each
        with speech.Session(speech.voice_name("en", variant)):
            pass
    with pytest.raises(RuntimeError, match="no voice variant"), speech.Session("en+no-such-variant"):
        pass
    male, _ = speech.synthesize("seven", "en+m1")
    female, _ = speech.synthesize("seven", "en+f3")
    n = min(len(male), len(female))
    assert not np.allclose(male[:n], female[:n], atol=1000)  # the variant changes the speaker
