"""Model building blocks: masking invariants, fused == explicit attention, log-mel, patching, limits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch

from workbench.config import load_config, to_dict, upgrade_model_keys
from workbench.data.audio import prepare_waveform
from workbench.errors import ConfigError, MediaError
from workbench.modalities import SAMPLE_RATE
from workbench.model.attention import Attention, capture_attention
from workbench.model.audio import frames_for, log_mel, mel_filterbank
from workbench.model.masking import bert_corruption, keep_counts, random_masking, unshuffle
from workbench.model.patching import (
    AudioPatcher,
    ImagePatcher,
    TextPatcher,
    VideoPatcher,
    grid_to_signal,
    patchify_2d,
    sincos_embedding,
    unpatchify_2d,
)


def _padding(lengths: list[int], N: int) -> torch.Tensor:
    return torch.arange(N)[None] >= torch.tensor(lengths)[:, None]


# -------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.95])
@pytest.mark.parametrize("lengths", [None, [10, 7, 3, 1]])
def test_random_masking_invariants(ratio, lengths):
    B, N, D = 4, 10, 3
    x = torch.arange(B * N * D, dtype=torch.float32).view(B, N, D)  # every token unique
    padding = None if lengths is None else _padding(lengths, N)
    valid = torch.full((B,), N) if lengths is None else torch.tensor(lengths)
    g = torch.Generator().manual_seed(0)
    m = random_masking(x, ratio, padding, generator=g)

    n_keep = keep_counts(valid, ratio)
    assert torch.equal(n_keep, torch.minimum((valid * (1 - ratio)).floor().long().clamp(min=1), valid))
    assert m.kept.shape == (B, int(n_keep.max()), D)
    assert torch.equal((~m.kept_padding).sum(1), n_keep)  # kept count per row
    # the kept tokens are the tokens at ids_keep
    assert torch.equal(m.kept, torch.gather(x, 1, m.ids_keep[..., None].expand(-1, -1, D)))
    # ids_restore is a permutation and inverts the shuffle: unshuffling puts every kept token back in place
    assert torch.equal(m.ids_restore.sort(1).values, torch.arange(N).expand(B, N))
    fill = torch.full((1, 1, D), -1.0)
    restored = unshuffle(m.kept, m.kept_padding, fill, m.ids_restore)
    kept_here = restored[..., 0] >= 0  # (B, N) positions that got a real token back
    assert torch.equal(restored[kept_here], x[kept_here])
    # 0 keep, 1 remove: the mask is 0 exactly where a token was kept, 1 on every other real token
    real = torch.ones(B, N, dtype=torch.bool) if padding is None else ~padding
    assert torch.equal(m.mask.bool(), real & ~kept_here)
    assert torch.equal(m.mask.sum(1).long(), valid - n_keep)
    # padding is never kept and never predicted
    if padding is not None:
        kept_ids = m.ids_keep[~m.kept_padding]
        rows = torch.arange(B)[:, None].expand_as(m.ids_keep)[~m.kept_padding]
        assert not padding[rows, kept_ids].any()
        assert not m.mask.bool()[padding].any()


def test_random_masking_is_reproducible_with_a_generator():
    x = torch.randn(3, 20, 4)
    a = random_masking(x, 0.6, generator=torch.Generator().manual_seed(5))
    b = random_masking(x, 0.6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.ids_restore, b.ids_restore) and torch.equal(a.mask, b.mask)


def test_bert_corruption_selects_only_real_tokens_and_splits_8_1_1():
    B, N, V = 64, 40, 500
    ids = torch.randint(4, V, (B, N))
    lengths = torch.randint(5, N + 1, (B,))
    padding = torch.arange(N)[None] >= lengths[:, None]
    ids = ids.masked_fill(padding, 0)
    corrupted, mask = bert_corruption(ids, 0.15, 2, (4, V), padding, torch.Generator().manual_seed(1))
    sel = mask.bool()
    assert torch.equal(sel.sum(1), (lengths * 0.15).round().long().clamp(min=1))
    assert not sel[padding].any()
    assert torch.equal(corrupted[~sel], ids[~sel])  # unselected tokens untouched
    frac_mask = (corrupted[sel] == 2).float().mean().item()
    frac_same = (corrupted[sel] == ids[sel]).float().mean().item()
    assert 0.72 < frac_mask < 0.88 and 0.04 < frac_same < 0.18
    assert ((corrupted[sel] >= 4) | (corrupted[sel] == 2)).all()  # random ids skip the special ids


# ------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("cross", [False, True])
def test_fused_attention_equals_explicit_with_padding(cross):
    torch.manual_seed(0)
    B, Q, K, dim, kv_dim = 3, 7, 9, 32, 24
    att = Attention(dim, 4, kv_dim=kv_dim if cross else None, cross=cross).eval()
    x = torch.randn(B, Q, dim)
    ctx = torch.randn(B, K, kv_dim) if cross else None
    Kn = K if cross else Q
    padding = _padding([Kn, Kn - 2, 1], Kn)
    fused = att(x, ctx, padding)
    with capture_attention(att) as maps:
        explicit = att(x, ctx, padding)
    weights = maps[""]
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)
    assert weights.shape == (B, 4, Q, Kn)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, 4, Q))
    assert (weights.permute(0, 2, 1, 3)[padding[:, None, None, :].expand(B, Q, 4, Kn)] == 0).all()


# ------------------------------------------------------------------------------------------ audio
def test_mel_filterbank_is_a_partition_of_unity_and_tone_lands_in_its_bin():
    n_mels, n_fft = 64, 512
    fb, centres = mel_filterbank(n_mels, n_fft, SAMPLE_RATE)
    assert fb.shape == (n_mels, n_fft // 2 + 1)
    assert (fb.sum(1) > 0).all()  # no empty filter
    bins = torch.linspace(0, SAMPLE_RATE / 2, n_fft // 2 + 1)
    inside = (bins >= centres[0]) & (bins <= centres[-1])
    torch.testing.assert_close(fb[:, inside].sum(0), torch.ones(int(inside.sum())), atol=1e-5, rtol=0)
    assert torch.all(centres[1:] > centres[:-1])

    cfg = load_config(overrides=["model.preset=small"]).model
    patcher = AudioPatcher(cfg)
    for f0 in (300.0, 1000.0, 3000.0):
        t = torch.arange(SAMPLE_RATE) / SAMPLE_RATE
        wave = torch.sin(2 * math.pi * f0 * t)[None]
        spec = log_mel(
            wave, torch.tensor([SAMPLE_RATE]), patcher.window, patcher.fb, cfg.audio_n_fft, cfg.audio_hop
        )
        loudest = spec[0, 5:-5].mean(0).argmax().item()  # the mel bin with the most energy
        nearest = (patcher.mel_centres - f0).abs().argmin().item()
        assert abs(loudest - nearest) <= 1, (f0, loudest, nearest)


def test_stft_power_matches_a_numpy_reference_frame():
    n_fft, hop = 512, 320
    g = torch.Generator().manual_seed(0)
    wave = torch.randn(1, 4000, generator=g)
    window = torch.hann_window(n_fft)
    spec = torch.stft(wave, n_fft, hop, window=window, center=True, pad_mode="constant", return_complex=True)
    assert spec.shape[-1] == frames_for(4000, hop)
    k = 5  # frame k is centred on sample k * hop
    padded = np.pad(wave[0].numpy(), n_fft // 2)
    frame = padded[k * hop : k * hop + n_fft] * window.numpy()
    ref = np.abs(np.fft.rfft(frame)) ** 2
    np.testing.assert_allclose(spec[0, :, k].abs().square().numpy(), ref, rtol=1e-4, atol=1e-3)


def test_bin_mean_normalisation_cancels_a_fixed_filter_on_real_speech(fsdd_dir):
    """model.audio_norm=bin_mean: a fixed linear filter on the waveform (here pre-emphasis and a
    3-tap low-pass, a microphone's colouring) adds a constant to each mel bin's log power, which the
    per-bin mean removes; the utterance-wide normalisation keeps it. A real FSDD recording, 8 kHz
    resampled to 16 kHz as the app and the FSDD loader do."""
    x, rate = soundfile.read(fsdd_dir / "recordings" / "7_jackson_3.wav", dtype="float32")
    wave = prepare_waveform(x, rate)[None]
    n = torch.tensor([wave.shape[1]])
    coloured = torch.cat([wave[:, :1], wave[:, 1:] - 0.95 * wave[:, :-1]], 1)
    low_pass = torch.tensor([[[0.25, 0.5, 0.25]]])
    coloured = torch.nn.functional.conv1d(coloured[:, None], low_pass, padding=1)[:, 0]
    cfg = load_config(overrides=["model.preset=small"]).model
    patcher = AudioPatcher(cfg)
    change = {}
    for per_bin in (False, True):
        a, b = (log_mel(w, n, patcher.window, patcher.fb, cfg.audio_n_fft, cfg.audio_hop, per_bin=per_bin)
                for w in (wave, coloured))  # fmt: skip
        assert abs(float(a.std()) - 1.0) < 0.01  # unit variance over the clip either way
        if per_bin:
            torch.testing.assert_close(a[0].mean(0), torch.zeros(cfg.n_mels), atol=1e-4, rtol=0)
        change[per_bin] = float((a - b).abs().mean())
    assert change[True] < 0.1 < 0.2 < change[False], change
    on = AudioPatcher(load_config(overrides=["model.preset=small", "model.audio_norm=bin_mean"]).model)
    assert on.per_bin and not patcher.per_bin
    with pytest.raises(ConfigError, match=r"model\.audio_norm"):
        load_config(overrides=["model.audio_norm=cepstral"])


def test_a_model_saved_before_audio_norm_existed_reloads_with_one_mean_and_scale_per_clip():
    """Whatever the default becomes, a checkpoint or run config written before ``model.audio_norm``
    existed is read back with the normalisation it was trained with."""
    kept = to_dict(load_config(overrides=["model.audio_norm=bin_mean"]))["model"]
    saved = {k: v for k, v in kept.items() if k != "audio_norm"}
    upgrade_model_keys(saved)
    assert saved["audio_norm"] == "utterance"
    upgrade_model_keys(kept)
    assert kept["audio_norm"] == "bin_mean"  # a saved choice is never overwritten


@pytest.mark.parametrize("norm", ["utterance", "bin_mean"])
def test_audio_patches_do_not_depend_on_batch_padding(norm):
    cfg = load_config(overrides=["model.preset=tiny", f"model.audio_norm={norm}"]).model
    patcher = AudioPatcher(cfg)
    g = torch.Generator().manual_seed(3)
    short = torch.randn(1, 7000, generator=g)
    alone = patcher(short, torch.tensor([7000]))
    batch = torch.zeros(2, 20000)
    batch[0] = torch.randn(20000, generator=g)
    batch[1, :7000] = short[0]
    both = patcher(batch, torch.tensor([20000, 7000]))
    n = alone.values.shape[1]
    torch.testing.assert_close(both.values[1, :n], alone.values[0], atol=1e-5, rtol=0)
    assert both.padding is not None and not both.padding[1, :n].any() and both.padding[1, n:].all()


def _spectrogram_patches(patcher: AudioPatcher, spec: torch.Tensor, frames: list[int]):
    """Patches of a given (B, T, n_mels) log-mel (T a multiple of the patch's frames), as the patcher
    lays them out, with time patches past each row's ``frames`` marked as padding."""
    from workbench.model.patching import Patches, grid_coords

    B, T = spec.shape[:2]
    gt, pt, pf, gf = T // patcher.pt, patcher.pt, patcher.pf, patcher.gf
    values = spec.reshape(B, gt, pt, gf, pf).transpose(2, 3).reshape(B, gt * gf, pt * pf)
    valid_t = (torch.tensor(frames) + pt - 1) // pt
    padding = torch.arange(gt).repeat_interleave(gf)[None] >= valid_t[:, None]
    return Patches(values, padding, (gt, gf), grid_coords((gt, gf)))


def _as_spectrogram(patcher: AudioPatcher, values: torch.Tensor, gt: int) -> torch.Tensor:
    B = values.shape[0]
    v = values.reshape(B, gt, patcher.gf, patcher.pt, patcher.pf).transpose(2, 3)
    return v.reshape(B, gt * patcher.pt, patcher.gf * patcher.pf)


def _warped_band(patcher: AudioPatcher, k: int, B: int = 64, gt: int = 4):
    """Clips whose every frame holds one bright mel band k, warped (generator seed 0): the patches,
    each clip's ratio (Hz of the band's centroid after / before) and the warped spectrograms."""
    T, F = gt * patcher.pt, patcher.fb.shape[0]
    spec = torch.zeros(B, T, F)
    spec[:, :, k] = 1.0
    p = _spectrogram_patches(patcher, spec, [T] * B)
    out = _as_spectrogram(patcher, patcher.augment(p, torch.Generator().manual_seed(0)).values, gt)
    centroid = (out[:, 0] * torch.arange(F)).sum(-1) / out[:, 0].sum(-1)  # (B,) fractional bins
    hz = np.interp(centroid.numpy(), np.arange(F), patcher.mel_centres.numpy())
    return p, hz / patcher.mel_centres[k].item(), out


def test_spec_warp_scales_a_formant_by_the_drawn_ratio():
    """model.spec_warp=w: each clip's frequencies are scaled by one factor in [1 - w, 1 + w] (VTLP), so
    a band at a bin of centre frequency c lands near c x factor, in Hz; factors above and below 1 are
    drawn; every frame of a clip moves alike; with no masks nothing is zeroed; the passed generator
    alone decides the draw."""
    cfg = load_config(overrides=["model.preset=tiny", "model.spec_warp=0.2"]).model
    patcher = AudioPatcher(cfg)
    p, ratio, out = _warped_band(patcher, 20)
    assert ((ratio > 0.8 - 0.03) & (ratio < 1.2 + 0.03)).all(), ratio
    assert (ratio > 1.1).any() and (ratio < 0.9).any()  # scaled both ways
    torch.testing.assert_close(out, out[:, :1].expand_as(out))  # one factor per clip, every frame alike
    torch.manual_seed(1)
    again = patcher.augment(p, torch.Generator().manual_seed(0)).values
    torch.testing.assert_close(_as_spectrogram(patcher, again, 4), out)


def test_spec_warp_ends_moves_low_and_high_bands_by_different_ratios():
    """model.spec_warp_ends: the lowest and highest mel bins draw their factors apart (each in
    [1 - w, 1 + w]), so a low and a high band of one clip move by different ratios, both ways across
    clips, while without it both bands of a clip move by the same ratio."""
    ratios = {}
    for ends in (False, True):
        overrides = ["model.preset=tiny", "model.spec_warp=0.2", f"model.spec_warp_ends={ends}"]
        cfg = load_config(overrides=overrides).model
        patcher = AudioPatcher(cfg)
        low, high = (_warped_band(patcher, k)[1] for k in (6, cfg.n_mels - 6))
        for r in (low, high):
            assert ((r > 0.8 - 0.04) & (r < 1.2 + 0.04)).all(), r
        ratios[ends] = (low, high)
    low, high = ratios[False]
    np.testing.assert_allclose(low, high, atol=0.03)  # one factor per clip
    low, high = ratios[True]
    gap = high - low
    assert (gap > 0.1).any() and (gap < -0.1).any()  # the ends drawn apart: either band may move more


def test_spec_tilt_adds_one_ramp_per_clip_inside_the_clip_only():
    """model.spec_tilt=t: each clip's log-mel gains a ramp across the mel bins, the same in every frame
    of the clip, rising by a drawn s in [-t, t] from the lowest bin to the highest; padding frames keep
    their values."""
    cfg = load_config(overrides=["model.preset=tiny", "model.spec_tilt=1.5"]).model
    patcher = AudioPatcher(cfg)
    g = torch.Generator().manual_seed(0)
    B, gt = 64, 4
    T = gt * patcher.pt
    frames = [T if i % 2 else patcher.pt for i in range(B)]
    spec = torch.randn(B, T, cfg.n_mels, generator=g)
    out = _as_spectrogram(patcher, patcher.augment(_spectrogram_patches(patcher, spec, frames), g).values, gt)
    added = out - spec
    ramp = torch.linspace(-0.5, 0.5, cfg.n_mels)
    rises = []
    for i, n in enumerate(frames):
        rise = (added[i, 0, -1] - added[i, 0, 0]).item()
        torch.testing.assert_close(added[i, :n], (rise * ramp).expand(n, -1), atol=1e-5, rtol=0)
        assert (added[i, n:] == 0).all()
        rises.append(rise)
    assert max(rises) > 0.5 and min(rises) < -0.5 and max(map(abs, rises)) <= 1.5 + 1e-5


def test_spec_masks_zero_whole_bands_and_spans_inside_the_clip_only():
    """SpecAugment (model.spec_freq_mask / spec_time_mask): zeroed cells form at most two bands of
    whole mel bins and two spans of whole frames, each no wider than its setting; spans fall inside the
    clip's frames; every other value is unchanged."""
    cfg = load_config(
        overrides=["model.preset=tiny", "model.spec_freq_mask=5", "model.spec_time_mask=4"]
    ).model
    patcher = AudioPatcher(cfg)
    g = torch.Generator().manual_seed(0)
    B, gt = 32, 5
    T = gt * patcher.pt
    frames = [T if i % 2 else 2 * patcher.pt for i in range(B)]  # every other clip is 2 patches long
    spec = torch.rand(B, T, cfg.n_mels, generator=g) + 1.0  # no zero anywhere, even in the padding
    p = _spectrogram_patches(patcher, spec, frames)
    out = _as_spectrogram(patcher, patcher.augment(p, g).values, gt)
    zero = out == 0
    widths = []
    for i, n in enumerate(frames):
        z = zero[i, :n]
        bins = z.all(0)  # bins zeroed in every frame of the clip
        rows = z.all(1)  # frames zeroed in every bin
        assert torch.equal(z, bins[None] | rows[:, None])  # nothing zeroed outside bands and spans
        for mask, width in ((bins, 5), (rows, 4)):
            edges = torch.diff(mask.int(), prepend=torch.zeros(1, dtype=torch.int32)).clamp(min=0).sum()
            assert edges <= 2 and mask.sum() <= 2 * width
        widths.append(int(rows.sum()))
        torch.testing.assert_close(out[i, :n][~z], spec[i, :n][~z])
        torch.testing.assert_close(out[i, n:], spec[i, n:] * ~bins)  # no time span past the clip
    assert max(widths) > 0 and zero.any()


def test_wave_echo_adds_three_decaying_taps_and_grows_the_clip_by_its_tail():
    """model.wave_echo=e: each clip's waveform gains copies of itself delayed by d, 2d and 3d with
    gains a, a^2 and a^3 (a drawn in [0, e], d in ``wave_echo_ms``, per clip); the clip's length grows
    by 3d, never past ``max_audio_seconds``; samples past the grown length stay 0."""
    cfg = load_config(
        overrides=["model.preset=tiny", "model.wave_echo=0.6", "model.wave_echo_ms=[10,40]"]
    ).model
    patcher = AudioPatcher(cfg)
    B, L = 64, 2000
    lengths = torch.tensor([L if i % 2 else 700 for i in range(B)])
    x = torch.zeros(B, L)
    x[:, 3] = 1.0  # an impulse: its echo is the impulse response
    x[:, 5] = -0.5
    y, grown = patcher.augment_input(x, lengths, torch.Generator().manual_seed(0))
    lo, hi = (round(ms * SAMPLE_RATE / 1000) for ms in cfg.wave_echo_ms)
    amps, delays = [], []
    for i in range(B):
        row = y[i]
        d = int(torch.nonzero(row[6:]).min()) + 6 - 3  # the first echo of the impulse at sample 3
        a = row[3 + d].item()
        assert lo <= d <= hi and 0 <= a <= 0.6
        expected = torch.nn.functional.pad(x[i], (0, y.shape[1] - L))
        for k in (1, 2, 3):
            expected[3 + k * d] += a**k
            expected[5 + k * d] += -0.5 * a**k
        torch.testing.assert_close(row, expected, atol=1e-6, rtol=1e-5)
        assert grown[i] == lengths[i] + 3 * d
        amps.append(a)
        delays.append(d)
    assert min(amps) < 0.15 and max(amps) > 0.45 and len(set(delays)) > 20
    long = torch.zeros(2, patcher.max_samples)
    long[:, -1] = 1.0  # a full-length clip: its tail is cut at the model's limit
    y, grown = patcher.augment_input(long, None, torch.Generator().manual_seed(0))
    assert y.shape[1] == patcher.max_samples and (grown == patcher.max_samples).all()
    torch.testing.assert_close(y, long)  # every echo of the last sample falls past the limit
    patcher(y, grown)  # and the model takes it


def test_text_unk_insert_puts_one_unk_at_a_drawn_gap_and_keeps_every_word_in_order():
    """model.text_unk_insert=q: a phrase grows by exactly one [UNK] (with probability q) at a gap drawn
    among its length + 1, every word kept in order around it; a phrase at max_text_tokens stays as it
    is, the draws replay from a seed, and off, nothing is drawn."""
    from workbench.model.text_tokenizer import PAD_ID, UNK_ID

    cfg = load_config(overrides=["model.preset=tiny", "model.text_unk_insert=0.5", "model.max_text_tokens=6"])
    patcher = TextPatcher(cfg.model)
    B = 400
    lengths = torch.randint(1, 7, (B,), generator=torch.Generator().manual_seed(1))
    x = torch.full((B, 6), PAD_ID)
    for i, n in enumerate(lengths.tolist()):
        x[i, :n] = torch.arange(10, 10 + n)  # distinct known ids, no [UNK]
    y, grown = patcher.augment_input(x, lengths, torch.Generator().manual_seed(0))
    assert y.shape == (B, 7)
    gaps = set()
    for i, n in enumerate(lengths.tolist()):
        row, words = y[i].tolist(), list(range(10, 10 + n))
        if grown[i] == n:  # not drawn, or already at the limit: unchanged
            assert row == words + [PAD_ID] * (7 - n)
            continue
        assert grown[i] == n + 1 and n < 6 and row.count(UNK_ID) == 1
        gap = row.index(UNK_ID)
        assert row[:gap] + row[gap + 1 : n + 1] == words and set(row[n + 1 :]) <= {PAD_ID}
        gaps.add((n, gap))
    short = lengths < 6
    share = (grown[short] > lengths[short]).float().mean().item()
    assert 0.4 < share < 0.6 and (grown[~short] == 6).all()
    assert {(3, g) for g in range(4)} <= gaps  # every gap of a 3-word phrase, the ends included
    again, _ = patcher.augment_input(x, lengths, torch.Generator().manual_seed(0))
    assert torch.equal(again, y)
    patcher(y, grown)  # and the model takes it
    off = TextPatcher(load_config(overrides=["model.preset=tiny"]).model)
    gen = torch.Generator().manual_seed(0)
    before = gen.get_state()
    assert off.augment_input(x, lengths, gen) == (x, lengths) and torch.equal(gen.get_state(), before)


def test_image_shift_moves_each_image_by_at_most_k_pixels_over_a_black_border():
    """model.image_shift=k: each image's content moves by one offset in [-k, k] along each axis (all
    offsets drawn over a batch), the uncovered border is black, and nothing else changes."""
    cfg = load_config(overrides=["model.preset=tiny", "model.image_shift=2"]).model
    patcher = ImagePatcher(cfg)
    B = 200
    x = torch.zeros(B, 1, 28, 28)
    x[:, 0, 10:14, 12:15] = torch.rand(B, 4, 3) + 0.5  # a blob away from the borders
    p = patcher(x)
    out = patcher.unpatchify(patcher.augment(p, torch.Generator().manual_seed(0)).values, (1, 28, 28))
    out = out * cfg.image_norm[1] + cfg.image_norm[0]  # back to pixels
    torch.testing.assert_close(out.sum((1, 2, 3)), x.sum((1, 2, 3)))  # the blob is moved, not cut
    offsets = set()
    for b in range(B):
        r, c = torch.nonzero(out[b, 0] > 0.25).min(0).values.tolist()
        dy, dx = r - 10, c - 12
        assert max(abs(dy), abs(dx)) <= 2
        torch.testing.assert_close(out[b, 0, 10 + dy : 14 + dy, 12 + dx : 15 + dx], x[b, 0, 10:14, 12:15])
        offsets.add((dy, dx))
    assert len(offsets) == 25  # every offset of the 5 x 5 window
    edge = torch.ones(1, 1, 28, 28)  # a white image: the uncovered border reads black
    moved = patcher.unpatchify(
        patcher.augment(patcher(edge), torch.Generator().manual_seed(1)).values, (1, 28, 28)
    )
    black = (moved * cfg.image_norm[1] + cfg.image_norm[0]).abs() < 1e-5
    assert 0 < black.sum() <= 28 * 28 - 24 * 24


def test_augmentation_runs_in_training_only_and_on_classification_batches_only():
    """The model augments a batch's patches only in training mode and only for a classification task:
    eval tokens equal a fresh patcher's, a dense task's input (image/denoise, whose target would have to
    move with it) never change, text only by the inserted [UNK], and with every setting at 0 no random
    number is drawn."""
    from workbench.modalities import default_tasks
    from workbench.model import build_model
    from workbench.model.synthetic import synthetic_batch
    from workbench.model.text_tokenizer import UNK_ID

    tasks = {t.key: t for t in default_tasks()}
    keys = ("audio/digit", "image/digit", "image/denoise", "text/digit")
    batches = {k: synthetic_batch(tasks[k], 4) for k in keys}
    noise = ["model.spec_warp=0.1", "model.spec_time_mask=3", "model.image_shift=2", "model.wave_echo=0.5",
             "model.text_unk_insert=1"]  # fmt: skip
    cfg = load_config(overrides=["model.preset=tiny", *noise, "model.text_unk=0", "model.text_shift=0"])
    model = build_model(cfg, list(tasks.values())).eval()
    with torch.no_grad():
        still = {k: model.tokenize(b)[1] for k, b in batches.items()}
        model.train()
        moved = {k: model.tokenize(b, torch.Generator().manual_seed(0))[1] for k, b in batches.items()}
        model.eval()
        again = {k: model.tokenize(b)[1] for k, b in batches.items()}
    for k in keys:
        torch.testing.assert_close(again[k], still[k])
    a, b = moved["audio/digit"], still["audio/digit"]
    assert a.shape != b.shape or not torch.allclose(a, b)  # the echo's tail may add tokens
    assert not torch.allclose(moved["image/digit"], still["image/digit"])
    torch.testing.assert_close(moved["image/denoise"], still["image/denoise"])
    n = still["text/digit"].shape[1] + 1
    assert moved["text/digit"].shape[1] == n  # every phrase grew by one token: one [UNK], nothing else
    emb = model.tokenizers["text"].weight
    content = moved["text/digit"] - sincos_embedding(torch.arange(float(n))[:, None], emb.shape[1])
    unk = torch.isclose(content, emb[UNK_ID].detach(), atol=1e-5).all(-1)  # (B, n)
    assert (unk.sum(1) == 1).all() and not (batches["text/digit"].x == UNK_ID).any()
    off = load_config(overrides=["model.preset=tiny"]).model
    gen = torch.Generator().manual_seed(0)
    before = gen.get_state()
    for patcher, b in (
        (AudioPatcher(off), batches["audio/digit"]),
        (ImagePatcher(off), batches["image/digit"]),
    ):
        p = patcher(b.x, b.lengths)
        assert patcher.augment(p, gen) is p
        x, lengths = patcher.augment_input(b.x, b.lengths, gen)
        assert x is b.x and lengths is b.lengths
    assert torch.equal(gen.get_state(), before)


# ------------------------------------------------------------------------------------------ patching
def test_patchify_unpatchify_are_inverse():
    x = torch.randn(2, 3, 28, 28)
    v = patchify_2d(x, 4)
    assert v.shape == (2, 49, 48)
    assert torch.equal(unpatchify_2d(v, 3, 4, 4, 7, 7), x)
    cfg = load_config(overrides=["model.preset=tiny"]).model
    img = ImagePatcher(cfg)  # standardises pixels with model.image_norm before patching
    mean, std = cfg.image_norm
    torch.testing.assert_close(img.unpatchify(img(x[:, :1]).values, (1, 28, 28)), (x[:, :1] - mean) / std)
    vid = VideoPatcher(cfg)
    clip = torch.rand(2, 8, 1, 32, 32)
    p = vid(clip)
    assert p.values.shape == (2, 64, 2 * 8 * 8) and p.grid == (4, 4, 4)
    clip = (clip - cfg.video_norm[0]) / cfg.video_norm[1]
    torch.testing.assert_close(vid.unpatchify(p.values, (8, 1, 32, 32)), clip)
    # the first tubelet holds frames 0-1, rows 0-7, columns 0-7
    torch.testing.assert_close(p.values[0, 0].view(2, 8, 8), clip[0, :2, 0, :8, :8])


def test_grid_to_signal_lays_every_patcher_out_as_its_signal():
    """The conv stem's view of the patches: the picture, the clip, the spectrogram, each in one piece."""
    cfg = load_config(overrides=["model.preset=tiny"]).model
    img = ImagePatcher(cfg)
    x = torch.rand(2, 1, 28, 28)
    p = img(x)
    torch.testing.assert_close(
        grid_to_signal(p.values, p.grid, img.patch_shape), (x - cfg.image_norm[0]) / cfg.image_norm[1]
    )
    vid = VideoPatcher(cfg)
    clip = torch.rand(2, 8, 1, 32, 32)
    p = vid(clip)
    want = ((clip - cfg.video_norm[0]) / cfg.video_norm[1]).transpose(1, 2)  # (B, C, T, H, W)
    torch.testing.assert_close(grid_to_signal(p.values, p.grid, vid.patch_shape), want)
    aud = AudioPatcher(cfg)
    wave = torch.randn(2, SAMPLE_RATE // 2)
    p = aud(wave)
    spec = grid_to_signal(p.values, p.grid, aud.patch_shape)  # (B, 1, time, mel)
    assert spec.shape == (2, 1, p.grid[0] * aud.pt, cfg.n_mels)
    # the first token holds frames 0..pt-1 of mel bins 0..pf-1; the second the next pf bins
    torch.testing.assert_close(p.values[:, 0].view(2, aud.pt, aud.pf), spec[:, 0, : aud.pt, : aud.pf])
    torch.testing.assert_close(
        p.values[:, 1].view(2, aud.pt, aud.pf), spec[:, 0, : aud.pt, aud.pf : 2 * aud.pf]
    )


def test_sincos_positions_are_distinct_and_bounded():
    coords = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij"), -1).view(-1, 2)
    pe = sincos_embedding(coords, 32)
    assert pe.shape == (20, 32) and pe.abs().max() <= 1
    assert torch.cdist(pe, pe).add(torch.eye(20)).min() > 0.1


def test_inputs_beyond_the_limits_raise_media_error():
    cfg = load_config(overrides=["model.preset=tiny"]).model
    audio = AudioPatcher(cfg)
    too_long = int(cfg.max_audio_seconds * SAMPLE_RATE) + 1
    with pytest.raises(MediaError, match="max_audio_seconds"):
        audio(torch.zeros(1, too_long), torch.tensor([too_long]))
    text = TextPatcher(cfg)
    with pytest.raises(MediaError, match="max_text_tokens"):
        text(torch.full((1, cfg.max_text_tokens + 1), 5), None)
    with pytest.raises(MediaError, match="vocabulary"):
        text(torch.tensor([[5, cfg.text_vocab_size]]), None)
    with pytest.raises(MediaError, match="image batch"):
        ImagePatcher(cfg)(torch.zeros(1, 3, 28, 28))
    # padding beyond the limit is fine: only the valid samples count
    ok = audio(torch.zeros(1, too_long + 100), torch.tensor([SAMPLE_RATE]))
    assert ok.values.shape[1] == math.ceil(frames_for(SAMPLE_RATE, cfg.audio_hop) / cfg.audio_patch[0]) * (
        cfg.n_mels // cfg.audio_patch[1]
    )
