"""Input resolution drawn per update: IMP's multi-resolution alternating training (METHOD.md section 4).

IMP varies the input resolution between updates (fewer tokens per sample at low resolution), so one
encoder learns every token-grid size. Each modality registers the resolutions it can take and how to
apply one to a batch; the token grid changes with it (the patchers accept smaller image grids and fewer
video frames, ``workbench/model/patching.py``):

=========  =====================================  ==================================================
modality   choices (defaults)                     applied as
=========  =====================================  ==================================================
image      side 20, 24, 28 px                     bilinear, antialiased resize: 5x5, 6x6, 7x7 patches
video      4 or 8 frames                          every 2nd frame (the same motion at half the frame
                                                  rate): 2 or 4 tubelet steps of 4x4 tubelets
audio      0.5 s or the whole clip                a random 0.5 s window of each clip
text       (none)                                 sub-words have no resolution
=========  =====================================  ==================================================

Image sides are the whole-patch sizes from 5/7 of the canvas up to all of it; video frame counts are the
whole-tubelet counts among {all, half}. Audio: our spoken digits last 0.14-0.78 s, so the paper-scale
crops (1 s, 2 s) would change nothing; 0.5 s cuts about a third of the clips and their token grid.

Everything is a pure function of the batch and a NumPy generator, which the objective seeds with
``(seed, stage, step, micro)``: the same update draws the same resolution in a resumed run. Dense
targets (``image/denoise``) live on the full grid, so the objective varies classification inputs only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from workbench.batch import Batch
from workbench.config import ModelConfig
from workbench.modalities import IMAGE_SIZE, SAMPLE_RATE, VIDEO_FRAMES

AUDIO_CROP_SECONDS = 0.5


def image_choices(cfg: ModelConfig) -> list[int]:
    """Image sides (px): whole patches, from 5/7 of the canvas up to the full canvas."""
    p = cfg.patch_size
    return [s for s in range(p, IMAGE_SIZE + 1, p) if 7 * s >= 5 * IMAGE_SIZE]


def video_choices(cfg: ModelConfig) -> list[int]:
    """Frame counts: all frames, or every 2nd frame when that is still a whole number of tubelets."""
    half = VIDEO_FRAMES // 2
    return ([half] if half % cfg.tubelet_frames == 0 and VIDEO_FRAMES % 2 == 0 else []) + [VIDEO_FRAMES]


def audio_choices(cfg: ModelConfig) -> list[float]:
    """Clip lengths (s): a 0.5 s window, or the whole clip (0 = no crop)."""
    return [AUDIO_CROP_SECONDS, 0.0]


def resize_image(batch: Batch, side: int, rng: np.random.Generator) -> Batch:
    """(B, 1, 28, 28) -> (B, 1, side, side), bilinear with antialiasing (a real lower resolution)."""
    if side == batch.x.shape[-1]:
        return batch
    x = F.interpolate(
        batch.x.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False
    )
    return replace(batch, x=x.clamp(0, 1))


def subsample_frames(batch: Batch, frames: int, rng: np.random.Generator) -> Batch:
    """(B, T, 1, S, S) -> (B, frames, 1, S, S): every (T / frames)-th frame from the first."""
    T = batch.x.shape[1]
    if frames == T:
        return batch
    return replace(batch, x=batch.x[:, :: T // frames][:, :frames])


def crop_audio(batch: Batch, seconds: float, rng: np.random.Generator) -> Batch:
    """A random ``seconds`` window of each row's valid samples (rows already shorter are kept whole);
    the batch is cut to its new longest row and ``lengths`` follow."""
    if seconds <= 0:
        return batch
    x, L = batch.x, batch.x.shape[1]
    lengths = torch.full((x.shape[0],), L) if batch.lengths is None else batch.lengths.cpu().long()
    window = round(seconds * SAMPLE_RATE)
    new = lengths.clamp(max=window)  # (B,)
    slack = (lengths - new).numpy()  # how far each window may start into its clip
    start = torch.from_numpy((rng.random(len(slack)) * (slack + 1)).astype(np.int64))  # uniform in [0, slack]
    width = int(new.max())
    idx = (start[:, None] + torch.arange(width)[None]).clamp(max=L - 1).to(x.device)  # (B, width)
    cropped = x.gather(1, idx)
    cropped = cropped * (torch.arange(width, device=x.device)[None] < new.to(x.device)[:, None])  # zero tail
    return replace(batch, x=cropped, lengths=new.to(x.device))


Choices = Callable[[ModelConfig], list]  # model config -> the resolutions a modality can take
Apply = Callable[[Batch, object, np.random.Generator], Batch]  # (batch, one resolution, rng) -> batch

# modality -> (its choices, how to apply one)
RESOLUTIONS: dict[str, tuple[Choices, Apply]] = {
    "image": (image_choices, resize_image),
    "video": (video_choices, subsample_frames),
    "audio": (audio_choices, crop_audio),
}


def draw_resolution(modality: str, cfg: ModelConfig, rng: np.random.Generator):
    """One resolution for ``modality`` drawn uniformly from its choices (None if it has none)."""
    if modality not in RESOLUTIONS:
        return None
    choices = RESOLUTIONS[modality][0](cfg)
    return choices[int(rng.integers(len(choices)))]


def vary_resolution(batch: Batch, cfg: ModelConfig, rng: np.random.Generator) -> tuple[Batch, object]:
    """``batch`` at a resolution drawn from ``rng``, and the choice (None: unchanged modality)."""
    choice = draw_resolution(batch.modality, cfg, rng)
    if choice is None:
        return batch, None
    return RESOLUTIONS[batch.modality][1](batch, choice, rng), choice
