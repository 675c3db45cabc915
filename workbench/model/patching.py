"""Per-modality reshaping of a batch's ``x`` into a sequence of patches, before any learned weight.

A *patcher* is the parameter-free half of a tokenizer: it checks the input against the tensor contract
of :mod:`workbench.modalities`, cuts it into patches on a token grid, reports which tokens are padding,
and gives each token its grid coordinates. The learned half (a projection plus positions) lives in
:mod:`workbench.model.tokenizers`; both the modality-specific and the unified tokenizer sit on these
same patchers, so the two ablation variants differ only in what they learn.

This module is where modalities are registered for the network (:data:`PATCHERS`); everything else in
``workbench.model`` iterates over it. A patcher is either a *signal* (numeric values: masked by
dropping tokens, target = per-patch normalised values) or *discrete* (ids: masked by BERT corruption,
target = the ids).

``patchify``/``unpatchify`` are an exact inverse pair (MAE habit); the layout inside a patch is
(time, row, column, channel) flattened, tokens are in row-major grid order (time/rows first), so
padding of variable-length inputs (audio frames) is always at the end of a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from workbench.config import ModelConfig
from workbench.errors import MediaError
from workbench.modalities import IMAGE_SIZE, SAMPLE_RATE, VIDEO_FRAMES, VIDEO_SIZE
from workbench.model.audio import frames_for, hz_to_mel, log_mel, mel_filterbank
from workbench.model.text_tokenizer import MASK_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID


@dataclass
class Patches:
    values: Tensor  # (B, N, P) float patches for signals, (B, N) int64 ids for discrete inputs
    padding: Tensor | None  # (B, N) bool, True = padding; None when every row is full
    grid: tuple[int, ...]  # token grid, N = prod(grid), row-major
    coords: Tensor  # (N, len(grid)) float: grid coordinates of each token (for positions)


def grid_coords(grid: tuple[int, ...], device=None) -> Tensor:
    """(prod(grid), len(grid)) float coordinates of a row-major grid."""
    axes = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], dim=-1)


def sincos_embedding(coords: Tensor, dim: int) -> Tensor:
    """Fixed sin-cos positions (Vaswani et al.; MAE's 2-D variant generalised to k axes): (N, k) -> (N, dim).

    The width is split over the axes (each part even, the first axis takes the remainder); each part is
    ``[sin(c * w), cos(c * w)]`` with frequencies ``w_i = 10000^(-i / (part/2))``.
    """
    k = coords.shape[1]
    part = (dim // (2 * k)) * 2
    sizes = [dim - part * (k - 1)] + [part] * (k - 1)
    out = []
    for axis, size in enumerate(sizes):
        half = size // 2
        omega = 1.0 / 10000 ** (torch.arange(half, device=coords.device, dtype=torch.float32) / max(half, 1))
        angle = coords[:, axis : axis + 1].float() * omega[None]  # (N, half)
        out += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(out, dim=-1)  # (N, dim)


def normalise_patches(values: Tensor) -> Tensor:
    """Per-patch zero mean, unit variance (MAE's ``norm_pix_loss`` target): (..., P) -> (..., P)."""
    mean = values.mean(dim=-1, keepdim=True)
    var = values.var(dim=-1, keepdim=True)
    return (values - mean) / (var + 1e-6) ** 0.5


def grid_to_signal(
    values: Tensor, grid: tuple[int, ...], patch_shape: tuple[int, ...], channels: int = 1
) -> Tensor:
    """Patches back to a channel-first signal for convolutions: (B, prod(grid), prod(patch_shape) * C)
    with the in-patch layout (axis..., channel) -> (B, C, grid[0] * patch_shape[0], grid[1] * ...).

    One function for every signal patcher: images (rows, columns), video tubelets (time, rows, columns)
    and audio patches (time, mel) all lay a token grid of patches out this way.
    """
    B, k = values.shape[0], len(grid)
    x = values.reshape(B, *grid, *patch_shape, channels)
    order = [0, 2 * k + 1] + [a for i in range(k) for a in (1 + i, 1 + k + i)]  # B, C, (g_i, p_i)...
    return x.permute(*order).reshape(B, channels, *[g * p for g, p in zip(grid, patch_shape)])


class Patcher(nn.Module):
    """Base class. Subclasses set ``discrete``, ``patch_numel`` and ``patch_shape`` (signals: the size
    of a patch along each grid axis, one channel) and ``max_tokens``."""

    discrete = False
    patch_numel = 0
    patch_shape: tuple[int, ...] = ()
    max_tokens = 0

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Patches:
        raise NotImplementedError

    def target(self, values: Tensor) -> Tensor:
        """The masked-prediction target of each token: normalised patch values, or the ids themselves."""
        return values if self.discrete else normalise_patches(values.float())

    def dense_numel(self, shape: tuple[int, ...]) -> int | None:
        """Values per token for a dense target of per-sample ``shape`` laid out on this token grid, or
        None when the target is not a picture on the grid (dense heads then predict from the pooled token)."""
        return None

    def augment_input(
        self, x: Tensor, lengths: Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Training-time augmentation of a batch's raw input, before patching (called like
        :meth:`augment`, and before it). The base patcher leaves it as it is."""
        return x, lengths

    def augment(self, p: Patches, generator: torch.Generator | None = None) -> Patches:
        """Training-time augmentation of a batch's patches (the model calls it in training mode only,
        with the training loop's seeded generator). The base patcher leaves them as they are."""
        return p

    def unpatchify(self, values: Tensor, shape: tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        """The token grid in words (for ``workbench model``)."""
        return ""


class ImagePatcher(Patcher):
    """(B, 1, 28, 28) -> 7x7 grid of 4x4 patches (patch_size=4): values (B, 49, 16).

    Pixels are standardised with ``model.image_norm`` first (the image processor's mean/std habit):
    raw MNIST patches are mostly exact zeros with a small spread, so their projections barely differ
    between images and the unit-amplitude positions drown them (an image/digit probe, small preset,
    batch 64, lr 3e-4: 33% instead of 24% val accuracy after 100 steps, 60% after 300). The
    masked-prediction target is per-patch normalised either way.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mean, self.std = cfg.image_norm
        self.p = cfg.patch_size
        self.g = IMAGE_SIZE // self.p
        self.patch_numel = self.p * self.p
        self.patch_shape = (self.p, self.p)
        self.max_tokens = self.g * self.g
        self.shift = cfg.image_shift

    def describe(self) -> str:
        return f"{self.g} x {self.g} patches of {self.p}x{self.p} pixels, 2-D positions"

    def augment(self, p: Patches, generator: torch.Generator | None = None) -> Patches:
        """Each image moved by a whole number of pixels drawn in [-image_shift, image_shift] along each
        axis, the uncovered border filled with the background (black). The draw is made on the CPU from
        ``generator``; 0 draws nothing."""
        if not self.shift:
            return p
        (gh, gw), B, s, dev = p.grid, p.values.shape[0], self.shift, p.values.device
        image = unpatchify_2d(p.values, 1, self.p, self.p, gh, gw)[:, 0]  # (B, H, W), standardised
        H, W = image.shape[1:]
        padded = nn.functional.pad(image, (s, s, s, s), value=-self.mean / self.std)
        dy, dx = torch.randint(0, 2 * s + 1, (2, B), generator=generator).to(dev)
        rows = (torch.arange(H, device=dev)[None] + dy[:, None])[:, :, None]  # (B, H, 1)
        cols = (torch.arange(W, device=dev)[None] + dx[:, None])[:, None, :]  # (B, 1, W)
        moved = padded[torch.arange(B, device=dev)[:, None, None], rows, cols]  # (B, H, W)
        return replace(p, values=patchify_2d(moved[:, None], self.p))

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Patches:
        # Smaller sides that are whole patches are accepted too (IMP's per-update resolution variation,
        # workbench/train/resolution.py): a 20x20 image is a 5x5 grid. Dense targets stay on the full grid.
        side_ok = lambda n: 0 < n <= IMAGE_SIZE and n % self.p == 0  # noqa: E731
        if x.ndim != 4 or x.shape[1] != 1 or not (side_ok(x.shape[2]) and side_ok(x.shape[3])):
            raise MediaError(
                f"an image batch must be (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) grey pixels; got {tuple(x.shape)}"
            )
        grid = (x.shape[2] // self.p, x.shape[3] // self.p)
        values = patchify_2d((x.float() - self.mean) / self.std, self.p)  # (B, N, p*p*C)
        return Patches(values, None, grid, grid_coords(grid, x.device))

    def dense_numel(self, shape: tuple[int, ...]) -> int | None:
        if len(shape) == 3 and shape[1] % self.g == 0 and shape[2] % self.g == 0:
            return shape[0] * (shape[1] // self.g) * (shape[2] // self.g)
        return None

    def unpatchify(self, values: Tensor, shape: tuple[int, ...]) -> Tensor:
        C, H, W = shape
        return unpatchify_2d(values, C, H // self.g, W // self.g, self.g, self.g)


def patchify_2d(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C), patch layout (row, col, channel)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify_2d(values: Tensor, C: int, ph: int, pw: int, gh: int, gw: int) -> Tensor:
    """Inverse of :func:`patchify_2d`: (B, gh*gw, ph*pw*C) -> (B, C, gh*ph, gw*pw)."""
    B = values.shape[0]
    x = values.reshape(B, gh, gw, ph, pw, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, gh * ph, gw * pw)


class VideoPatcher(Patcher):
    """(B, 8, 1, 32, 32) -> tubelets of tubelet_frames x p x p: a (T/t, 32/p, 32/p) grid, 3-D coordinates."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mean, self.std = cfg.video_norm  # standardised first, as images
        self.t, self.p = cfg.tubelet_frames, cfg.video_patch
        self.grid = (VIDEO_FRAMES // self.t, VIDEO_SIZE // self.p, VIDEO_SIZE // self.p)
        self.patch_numel = self.t * self.p * self.p
        self.patch_shape = (self.t, self.p, self.p)
        self.max_tokens = math.prod(self.grid)

    def describe(self) -> str:
        return (
            f"{' x '.join(map(str, self.grid))} tubelets of {self.t} frames x {self.p}x{self.p} pixels, "
            "3-D positions"
        )

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Patches:
        want = (VIDEO_FRAMES, 1, VIDEO_SIZE, VIDEO_SIZE)
        # Fewer frames (a whole number of tubelets) are accepted too: IMP's per-update resolution variation.
        frames_ok = x.ndim == 5 and 0 < x.shape[1] <= VIDEO_FRAMES and x.shape[1] % self.t == 0
        if not frames_ok or tuple(x.shape[2:]) != want[1:]:
            raise MediaError(
                f"a video batch must be (B, {', '.join(map(str, want))}) frames; got {tuple(x.shape)}"
            )
        grid = (x.shape[1] // self.t, *self.grid[1:])
        values = patchify_3d((x.float() - self.mean) / self.std, self.t, self.p)
        return Patches(values, None, grid, grid_coords(grid, x.device))

    def dense_numel(self, shape: tuple[int, ...]) -> int | None:
        gt, gh, gw = self.grid
        if len(shape) == 4 and shape[0] % gt == 0 and shape[2] % gh == 0 and shape[3] % gw == 0:
            return shape[0] // gt * shape[1] * (shape[2] // gh) * (shape[3] // gw)
        return None

    def unpatchify(self, values: Tensor, shape: tuple[int, ...]) -> Tensor:
        T, C, H, W = shape
        gt, gh, gw = self.grid
        B = values.shape[0]
        x = values.reshape(B, gt, gh, gw, T // gt, H // gh, W // gw, C)
        return x.permute(0, 1, 4, 7, 2, 5, 3, 6).reshape(B, T, C, H, W)


def patchify_3d(x: Tensor, t: int, p: int) -> Tensor:
    """(B, T, C, H, W) -> (B, (T/t)*(H/p)*(W/p), t*p*p*C), patch layout (time, row, col, channel)."""
    B, T, C, H, W = x.shape
    x = x.reshape(B, T // t, t, C, H // p, p, W // p, p)
    return x.permute(0, 1, 4, 6, 2, 5, 7, 3).reshape(B, (T // t) * (H // p) * (W // p), t * p * p * C)


class AudioPatcher(Patcher):
    """(B, L) waveform + lengths -> normalised log-mel (B, frames, n_mels) -> (time x mel) patches.

    Grid (time patches, mel patches), time-major. A row's tokens are padding when their time patch
    starts after the row's last STFT frame. Waveforms longer than ``model.max_audio_seconds`` raise
    MediaError (never truncated).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_fft, self.hop = cfg.audio_n_fft, cfg.audio_hop
        self.pt, self.pf = cfg.audio_patch
        self.gf = cfg.n_mels // self.pf
        self.max_samples = round(cfg.max_audio_seconds * SAMPLE_RATE)
        self.max_seconds = cfg.max_audio_seconds
        self.patch_numel = self.pt * self.pf
        self.patch_shape = (self.pt, self.pf)
        self.max_tokens = math.ceil(frames_for(self.max_samples, self.hop) / self.pt) * self.gf
        fb, centres = mel_filterbank(cfg.n_mels, self.n_fft, SAMPLE_RATE)
        self.register_buffer("fb", fb, persistent=False)  # (n_mels, n_fft//2+1), rebuilt from the config
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self.register_buffer("mel_centres", centres, persistent=False)
        self.warp, self.tilt, self.warp_ends = cfg.spec_warp, cfg.spec_tilt, cfg.spec_warp_ends
        self.freq_mask, self.time_mask = cfg.spec_freq_mask, cfg.spec_time_mask
        self.per_bin = cfg.audio_norm == "bin_mean"
        self.echo = cfg.wave_echo
        self.echo_samples = [round(ms * SAMPLE_RATE / 1000) for ms in cfg.wave_echo_ms]

    def describe(self) -> str:
        return (
            f"up to {self.max_tokens // self.gf} x {self.gf} patches of {self.pt} frames x {self.pf} mel "
            f"bins ({self.max_seconds:g} s), time-frequency positions"
        )

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Patches:
        if x.ndim != 2:
            raise MediaError(f"an audio batch must be (B, samples) mono waveforms; got {tuple(x.shape)}")
        B, L = x.shape
        lengths = torch.full((B,), L, device=x.device) if lengths is None else lengths.to(x.device).long()
        longest, shortest = int(lengths.max()), int(lengths.min())
        if longest > self.max_samples:
            raise MediaError(
                f"the audio is {longest / SAMPLE_RATE:.2f} s long; the model takes at most "
                f"{self.max_seconds:g} s (model.max_audio_seconds): trim it"
            )
        if shortest < 1 or longest > L:
            raise MediaError(f"audio lengths must be in [1, {L}] samples; got {lengths.tolist()}")
        spec = log_mel(  # (B, T, n_mels)
            x[:, :longest], lengths, self.window, self.fb, self.n_fft, self.hop, per_bin=self.per_bin
        )
        valid_t = (frames_for(lengths, self.hop) + self.pt - 1) // self.pt  # (B,) time patches per row
        gt = int(valid_t.max())
        T = gt * self.pt
        spec = spec[:, :T] if spec.shape[1] >= T else nn.functional.pad(spec, (0, 0, 0, T - spec.shape[1]))
        values = self._patchify(spec)
        t_of_token = torch.arange(gt, device=x.device).repeat_interleave(self.gf)  # (N,)
        padding = t_of_token[None] >= valid_t[:, None]  # (B, N)
        grid = (gt, self.gf)
        return Patches(values, padding if padding.any() else None, grid, grid_coords(grid, x.device))

    def _patchify(self, spec: Tensor) -> Tensor:
        """(B, gt * pt, n_mels) log-mel -> (B, gt * gf, pt * pf) patches, time-major."""
        B, gt = spec.shape[0], spec.shape[1] // self.pt
        values = spec.reshape(B, gt, self.pt, self.gf, self.pf).transpose(2, 3)  # (B, gt, gf, pt, pf)
        return values.reshape(B, gt * self.gf, self.patch_numel)

    def _spectrogram(self, values: Tensor) -> Tensor:
        """Inverse of :meth:`_patchify`."""
        B, gt = values.shape[0], values.shape[1] // self.gf
        v = values.reshape(B, gt, self.gf, self.pt, self.pf).transpose(2, 3)  # (B, gt, pt, gf, pf)
        return v.reshape(B, gt * self.pt, self.gf * self.pf)

    def augment_input(
        self, x: Tensor, lengths: Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``wave_echo``: per clip, a room's echo added to the waveform (reverberation is the standard
        augmentation for speech heard in rooms, Ko et al. 2017): ``y[n] = x[n] + sum_k a^k x[n - k d]``
        for taps k = 1..3, the amplitude a drawn in [0, wave_echo] and the delay d in ``wave_echo_ms``.
        The clip grows by its echo's tail (3 d), up to ``max_audio_seconds``; the log-mel standardises
        the level. Draws (on the CPU, from ``generator``) only when on."""
        if not self.echo or x.ndim != 2:
            return x, lengths
        B, L = x.shape
        dev = x.device
        lengths = torch.full((B,), L, device=dev) if lengths is None else lengths.to(dev).long()
        amp = self.echo * torch.rand(B, generator=generator, dtype=torch.float64)
        lo, hi = self.echo_samples
        delay = torch.randint(lo, hi + 1, (B,), generator=generator).to(dev)
        taps = 3
        grown = torch.minimum(lengths + taps * delay, lengths.clamp(min=self.max_samples))
        out_len = int(grown.max())
        n = torch.arange(out_len, device=dev)[None]  # (1, L')
        src = nn.functional.pad(x, (0, max(0, out_len - L)))[:, :out_len]
        y = src
        for k in range(1, taps + 1):
            idx = n - k * delay[:, None]  # (B, L')
            inside = (idx >= 0) & (idx < lengths[:, None])
            gain = (amp**k).to(dev, x.dtype)[:, None]
            y = y + gain * src.gather(1, idx.clamp(0, out_len - 1)) * inside
        y = y * (n < grown[:, None])
        return y, grown

    def augment(self, p: Patches, generator: torch.Generator | None = None) -> Patches:
        """Per clip, on the normalised log-mel, in this order (each off at 0, when it draws nothing):

        * ``spec_warp``: every frequency scaled by a factor drawn in [1 - w, 1 + w] (vocal tract
          length perturbation, Jaitly & Hinton 2013: a longer or shorter vocal tract moves the
          formants by a ratio), read off the mel bins by linear interpolation; on the mel scale a
          ratio is a shift of a few bins at high frequencies and of a fraction of one at low ones;
          with ``spec_warp_ends`` the lowest and the highest bin draw their factors apart and the
          bins between take the log-linear blend (low and high formants move by different ratios);
        * ``spec_tilt``: a ramp across the mel bins rising by s drawn in [-t, t] from the lowest to
          the highest (normalised units: a brighter or duller voice), inside the clip's frames;
        * SpecAugment's masks (Park et al. 2019): two bands of up to ``spec_freq_mask`` mel bins and
          two spans of up to ``spec_time_mask`` frames inside the clip set to 0, the clip's mean.

        Every draw is made on the CPU from ``generator``."""
        if not (self.warp or self.tilt or self.freq_mask or self.time_mask):
            return p
        spec = self._spectrogram(p.values)  # (B, T, F)
        (B, T, F), dev = spec.shape, spec.device
        if self.warp:
            draws = 2 if self.warp_ends else 1
            ends = 1.0 + self.warp * (
                2.0 * torch.rand(B, draws, generator=generator, dtype=torch.float64) - 1.0
            )
            factor = ends  # (B, 1): one ratio for every frequency
            if self.warp_ends:  # (B, F): log-linear along the mel axis from the lowest bin's to the highest's
                t = torch.linspace(0.0, 1.0, F, dtype=torch.float64)[None]
                factor = torch.exp(ends[:, :1].log() * (1 - t) + ends[:, 1:].log() * t)
            # output bin k shows the frequency centre_k / factor_k: its fractional index on the mel grid,
            # whose centres are equally spaced in mel
            mel = hz_to_mel(self.mel_centres.cpu().double()[None] / factor)  # (B, F)
            first, last = hz_to_mel(self.mel_centres.cpu()[[0, -1]])
            src = ((mel - first) / (last - first) * (F - 1)).clamp(0, F - 1).float()
            lo = src.floor().long()
            frac = (src - lo).to(dev, spec.dtype)[:, None]  # (B, 1, F)
            lo, hi = (
                lo.to(dev)[:, None].expand(B, T, F),
                (lo + 1).clamp(max=F - 1).to(dev)[:, None].expand(B, T, F),
            )
            spec = spec.gather(2, lo) * (1 - frac) + spec.gather(2, hi) * frac
        frames = (  # STFT frames in each clip's time patches
            torch.full((B,), T)
            if p.padding is None
            else (~p.padding.cpu()).view(B, -1, self.gf)[:, :, 0].sum(1) * self.pt
        )
        if self.tilt:
            slope = self.tilt * (2.0 * torch.rand(B, generator=generator) - 1.0)  # (B,)
            ramp = slope[:, None, None] * torch.linspace(-0.5, 0.5, F)[None, None]  # (B, 1, F)
            inside = (torch.arange(T)[None] < frames[:, None]).unsqueeze(-1)  # (B, T, 1): padding stays 0
            spec = spec + (ramp * inside).to(dev, spec.dtype)
        keep = torch.ones(B, T, F, dtype=torch.bool)
        if self.freq_mask:
            keep &= ~_spans(B, F, torch.full((B,), F), self.freq_mask, generator)[:, None, :]
        if self.time_mask:
            keep &= ~_spans(B, T, frames, self.time_mask, generator)[:, :, None]
        return replace(p, values=self._patchify(spec * keep.to(dev, spec.dtype)))


def _spans(
    rows: int, size: int, extent: Tensor, width: int, generator: torch.Generator | None, n: int = 2
) -> Tensor:
    """(rows, size) bool: per row, ``n`` spans of a width drawn in [0, width], each starting at a
    point drawn so that it lies inside the row's first ``extent`` positions (SpecAugment's masks)."""
    hit = torch.zeros(rows, size, dtype=torch.bool)
    pos = torch.arange(size)[None]
    for _ in range(n):
        w = torch.randint(0, width + 1, (rows,), generator=generator)
        w = torch.minimum(w, extent)
        start = (torch.rand(rows, generator=generator) * (extent - w + 1)).floor().long()
        hit |= (pos >= start[:, None]) & (pos < (start + w)[:, None])
    return hit


class TextPatcher(Patcher):
    """(B, N) token ids (words or BPE sub-words) + lengths -> the ids themselves, one token each, 1-D coordinates."""

    discrete = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vocab_size = cfg.text_vocab_size
        self.max_tokens = cfg.max_text_tokens
        self.mask_id = MASK_ID
        self.random_ids = (len(SPECIAL_TOKENS), cfg.text_vocab_size)  # BERT's random replacements
        self.unk_insert = cfg.text_unk_insert

    def describe(self) -> str:
        return f"up to {self.max_tokens} word or sub-word ids, 1-D positions, padding mask"

    def augment_input(
        self, x: Tensor, lengths: Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``text_unk_insert``: each phrase, with that probability, gets one ``[UNK]`` at a gap drawn
        uniformly among its length + 1 gaps (a word the vocabulary does not know, where a new phrasing
        would put one: "Zimmer Nummer 3" reads ``[UNK] [UNK] 3``); word dropout only ever replaces a
        word. A phrase already at ``max_tokens`` is left as it is. Draws (on the CPU, from
        ``generator``) only when on; the batch grows by one column only if a phrase grew."""
        if not self.unk_insert or x.ndim != 2:
            return x, lengths
        B, N = x.shape
        dev = x.device
        lengths = (x != PAD_ID).sum(1) if lengths is None else lengths.to(dev).long()
        grow = torch.rand(B, generator=generator) < self.unk_insert
        gap = (torch.rand(B, generator=generator) * (lengths.cpu() + 1)).floor().long()
        grow = (grow & (lengths.cpu() < self.max_tokens)).to(dev)
        if not bool(grow.any()):
            return x, lengths
        gap = gap.to(dev)[:, None]
        j = torch.arange(N + 1, device=dev)[None]  # (1, N + 1)
        moved = grow[:, None] & (j > gap)  # these read the id one slot to their left
        y = nn.functional.pad(x, (0, 1), value=PAD_ID).gather(1, j - moved.long())
        y = torch.where(grow[:, None] & (j == gap), UNK_ID, y)
        return y, lengths + grow.long()

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Patches:
        if x.ndim != 2 or x.dtype != torch.long:
            raise MediaError(f"a text batch must be (B, N) int64 token ids; got {tuple(x.shape)} {x.dtype}")
        N = x.shape[1]
        lengths = (x != 0).sum(1) if lengths is None else lengths.to(x.device).long()
        longest = int(lengths.max())
        if longest > self.max_tokens:
            raise MediaError(
                f"the text is {longest} tokens long; the model takes at most {self.max_tokens} "
                "(model.max_text_tokens): shorten it"
            )
        if int(lengths.min()) < 1 or longest > N:
            raise MediaError(f"text lengths must be in [1, {N}] tokens; got {lengths.tolist()}")
        ids = x[:, :longest]
        if int(ids.max()) >= self.vocab_size or int(ids.min()) < 0:
            raise MediaError(
                f"token id {int(ids.max())} is outside the model's text vocabulary ({self.vocab_size} ids): "
                "the text tokenizer does not match this model"
            )
        padding = torch.arange(longest, device=x.device)[None] >= lengths[:, None]  # (B, N)
        return Patches(ids, padding if padding.any() else None, (longest,), grid_coords((longest,), x.device))


# The network's modality registry: one patcher per modality in workbench.modalities.MODALITIES.
PATCHERS: dict[str, type[Patcher]] = {
    "image": ImagePatcher,
    "audio": AudioPatcher,
    "text": TextPatcher,
    "video": VideoPatcher,
}
