"""Masking for masked-prediction pre-training: pure functions of (tokens, padding, ratio, generator).

Mask convention, written once: **0 keep, 1 remove** (a removed token is one the decoder predicts).

Two styles, chosen by the input type, not by the modality's name:

* :func:`random_masking` (MAE, He et al. 2022) for numeric signals (image, audio spectrogram, video):
  shuffle the tokens by argsort of uniform noise, keep the first ones, drop the rest before the
  encoder. The decoder puts mask tokens back in the original order with ``ids_restore``.
* :func:`bert_corruption` (BERT, Devlin et al. 2019) for discrete ids (text): select a fraction of the
  tokens with the same noise-argsort draw, then replace 80% of them with ``[MASK]``, 10% with a
  random id and leave 10% unchanged. The encoder sees the whole corrupted sequence.

Variable-length rows (``padding`` True = padding) are handled by giving padding tokens noise 2.0, so
they sort after every real token (noise is in [0, 1)). Per row, the keep/select count is computed from
that row's number of real tokens, so padding is never kept, never selected and never predicted. Rows
keep different numbers of tokens; the kept tensor is as wide as the largest count and
``kept_padding`` marks the extra slots, which the encoder must ignore (key padding) and the decoder
must overwrite with mask tokens (the slot may hold a removed token: reading it would leak the answer).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Masked(NamedTuple):
    kept: Tensor  # (B, K, D) the kept tokens, in shuffled order
    mask: Tensor  # (B, N) float, original order: 0 keep, 1 remove; padding is 0 and never kept
    ids_restore: Tensor  # (B, N) int64: position of each original token in the shuffled order
    ids_keep: Tensor  # (B, K) int64: original index of each kept slot
    kept_padding: Tensor  # (B, K) bool: True where a kept slot is beyond its row's keep count


def _shuffle(B: int, N: int, padding: Tensor | None, device, generator: torch.Generator | None):
    """Noise-argsort shuffle with padding last. Returns (ids_shuffle, ids_restore, valid (B,))."""
    if generator is None:
        noise = torch.rand(B, N, device=device)
    else:
        noise = torch.rand(B, N, generator=generator, device=generator.device).to(device)
    if padding is not None:
        noise = noise.masked_fill(padding, 2.0)  # sorts after every real token
        valid = (~padding).sum(1)
    else:
        valid = torch.full((B,), N, device=device, dtype=torch.long)
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, N) ascending: real tokens in random order, then padding
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N) inverse permutation
    return ids_shuffle, ids_restore, valid


def keep_counts(valid: Tensor, ratio: float) -> Tensor:
    """Tokens kept per row: floor(valid * (1 - ratio)) as in MAE, at least 1, at most ``valid``."""
    return torch.minimum((valid * (1.0 - ratio)).floor().long().clamp(min=1), valid)


def random_masking(
    x: Tensor, ratio: float, padding: Tensor | None = None, generator: torch.Generator | None = None
) -> Masked:
    """Keep a random ``1 - ratio`` of each row's real tokens. x (B, N, D); padding (B, N) True = padding."""
    B, N, D = x.shape
    ids_shuffle, ids_restore, valid = _shuffle(B, N, padding, x.device, generator)
    n_keep = keep_counts(valid, ratio)  # (B,)
    K = int(n_keep.max())
    ids_keep = ids_shuffle[:, :K]  # (B, K)
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
    kept_padding = torch.arange(K, device=x.device)[None] >= n_keep[:, None]  # (B, K)
    rank = torch.arange(N, device=x.device)[None]  # position in the shuffled order
    removed = (rank >= n_keep[:, None]) & (rank < valid[:, None])  # (B, N) shuffled order
    mask = torch.gather(removed, 1, ids_restore).float()  # (B, N) original order: 0 keep, 1 remove
    return Masked(kept, mask, ids_restore, ids_keep, kept_padding)


def unshuffle(kept: Tensor, kept_padding: Tensor, fill: Tensor, ids_restore: Tensor) -> Tensor:
    """Inverse of :func:`random_masking` for decoders: kept (B, K, D) -> (B, N, D) in original order.

    Every slot that was not kept (including ``kept_padding`` slots) becomes ``fill`` (1, 1, D), the
    learned mask token; padding positions get it too and are ignored through the padding mask.
    """
    B, K, D = kept.shape
    N = ids_restore.shape[1]
    kept = torch.where(kept_padding.unsqueeze(-1), fill.to(kept.dtype), kept)
    full = torch.cat([kept, fill.to(kept.dtype).expand(B, N - K, D)], dim=1)  # (B, N, D) shuffled order
    return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))  # (B, N, D) original order


def bert_corruption(
    ids: Tensor,
    ratio: float,
    mask_id: int,
    vocab: tuple[int, int],
    padding: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Select ``ratio`` of each row's real tokens (at least one if ratio > 0) and corrupt them 8:1:1 (BERT).

    ids (B, N) int64; ``vocab`` = (first, end) range of ids a random replacement is drawn from (skip
    the special ids). Returns ``(corrupted ids (B, N), mask (B, N) float, 1 = selected/predicted)``.
    """
    B, N = ids.shape
    _, ids_restore, valid = _shuffle(B, N, padding, ids.device, generator)
    n_sel = torch.minimum((valid * ratio).round().long().clamp(min=1 if ratio > 0 else 0), valid)  # (B,)
    rank = torch.arange(N, device=ids.device)[None]
    mask = torch.gather(rank < n_sel[:, None], 1, ids_restore)  # (B, N) bool, original order
    if generator is None:
        u = torch.rand(B, N, device=ids.device)
        rand_ids = torch.randint(vocab[0], vocab[1], (B, N), device=ids.device)
    else:
        u = torch.rand(B, N, generator=generator, device=generator.device).to(ids.device)
        rand_ids = torch.randint(vocab[0], vocab[1], (B, N), generator=generator, device=generator.device)
        rand_ids = rand_ids.to(ids.device)
    corrupted = torch.where(mask & (u < 0.8), torch.full_like(ids, mask_id), ids)
    corrupted = torch.where(mask & (u >= 0.8) & (u < 0.9), rand_ids, corrupted)
    return corrupted, mask.float()
