"""Random batches that follow the tensor contract of :mod:`workbench.modalities`, for tests and benchmarks.

They exercise shapes, padding and gradients without the dataset: variable-length rows for audio and
text (the first row is always full length, the others shorter), labels drawn from the task.
"""

from __future__ import annotations

import math

import torch

from workbench.batch import Batch
from workbench.modalities import IMAGE_SIZE, SAMPLE_RATE, VIDEO_FRAMES, VIDEO_SIZE, TaskSpec
from workbench.model.text_tokenizer import SPECIAL_TOKENS


def synthetic_batch(
    task: TaskSpec,
    batch_size: int = 4,
    seed: int = 0,
    audio_seconds: float = 1.0,
    text_tokens: int = 12,
    vocab_size: int = 300,
) -> Batch:
    g = torch.Generator().manual_seed(seed)
    B = batch_size
    lengths = None
    if task.modality == "image":
        x = torch.rand(B, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    elif task.modality == "video":
        x = torch.rand(B, VIDEO_FRAMES, 1, VIDEO_SIZE, VIDEO_SIZE, generator=g)
    elif task.modality == "audio":
        L = int(audio_seconds * SAMPLE_RATE)
        lengths = torch.linspace(L, max(L // 3, 1), B).long()
        t = torch.arange(L) / SAMPLE_RATE
        f0 = 200 + 600 * torch.rand(B, 1, generator=g)
        x = 0.5 * torch.sin(2 * math.pi * f0 * t) + 0.05 * torch.randn(B, L, generator=g)
        x = x * (torch.arange(L)[None] < lengths[:, None])  # zero padding on the right
    elif task.modality == "text":
        lengths = torch.linspace(text_tokens, max(text_tokens // 3, 1), B).long()
        x = torch.randint(len(SPECIAL_TOKENS), vocab_size, (B, text_tokens), generator=g)
        x = x * (torch.arange(text_tokens)[None] < lengths[:, None])  # 0 = padding
    else:
        raise ValueError(f"no synthetic data for modality {task.modality!r}")
    if task.kind == "classification":
        y = torch.randint(0, task.num_classes, (B,), generator=g)
    else:
        y = torch.rand(B, *task.shape, generator=g)
    return Batch(task.modality, task.name, x.float() if x.is_floating_point() else x, y, lengths)
