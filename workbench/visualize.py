"""Pictures of what the network does, as tensors (no plotting library here: notebooks and the app draw them).

* :func:`masked_reconstruction`: the MAE figure — original, masked input, and the decoder's
  reconstruction with the visible patches pasted back — for any signal modality on a grid (image,
  video frames, audio log-mel).
* :func:`attention_rollout`: Abnar & Zuidema (2020) rollout through a stack of self-attention maps.
* :func:`token_heat`: one attention row (or a rollout) laid back on the input's token grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from workbench.batch import Batch


def _to_grid(values: Tensor, grid: tuple[int, ...], patch: tuple[int, ...]) -> Tensor:
    """(B, N, prod(patch)) patches of a 2-D grid -> (B, grid0*patch0, grid1*patch1) picture."""
    B = values.shape[0]
    (g0, g1), (p0, p1) = grid, patch
    x = values.reshape(B, g0, g1, p0, p1).permute(0, 1, 3, 2, 4)  # (B, g0, p0, g1, p1)
    return x.reshape(B, g0 * p0, g1 * p1)


def picture(model, batch: Batch, values: Tensor, grid: tuple[int, ...]) -> Tensor:
    """Patch values (B, N, P) of ``batch``'s modality back to pixels: images (B, 1, H, W), video
    (B, T, 1, H, W), audio log-mel (B, frames, mels)."""
    patcher = model.patchers[batch.modality]
    if batch.modality == "audio":
        return _to_grid(values, grid, (patcher.pt, patcher.pf))
    pixels = values * patcher.std + patcher.mean  # undo the patcher's standardisation
    return patcher.unpatchify(pixels, tuple(batch.x.shape[1:]))


@torch.no_grad()
def masked_reconstruction(model, batch: Batch, ratio: float, seed: int = 0) -> dict[str, Tensor]:
    """``{"original", "masked", "reconstruction"}`` in the input's own space (see :func:`picture`).

    The decoder predicts per-patch *normalised* values (MAE's norm_pix target), so each predicted patch
    is shown with the mean and spread of the true patch, as in MAE's figures; masked patches of the
    "masked" picture are drawn at the minimum value.
    """
    if model.patchers[batch.modality].discrete:
        raise ValueError(f"{batch.modality} is discrete (token ids): there is no picture to reconstruct")
    model.eval()
    out = model.forward_masked(batch, ratio, generator=torch.Generator().manual_seed(seed))
    p = model.patchers[batch.modality](batch.x, batch.lengths)
    values = p.values.float()  # (B, N, P)
    mean, std = values.mean(-1, keepdim=True), (values.var(-1, keepdim=True) + 1e-6) ** 0.5
    recon = out.pred.float() * std + mean
    mask = out.mask.float()[..., None]  # (B, N, 1): 1 = removed and predicted
    floor = values.min()
    return {
        "original": picture(model, batch, values, p.grid),
        "masked": picture(model, batch, values * (1 - mask) + floor * mask, p.grid),
        "reconstruction": picture(model, batch, values * (1 - mask) + recon * mask, p.grid),
        "mask_ratio": torch.tensor(float(out.mask.float().mean())),
    }


def attention_rollout(maps: list[Tensor], residual: float = 0.5) -> Tensor:
    """Rollout of self-attention maps ``[(B, H, N, N), ...]`` (first layer first) -> (B, N, N).

    Heads are averaged, the residual stream is modelled as ``residual * I + (1 - residual) * A`` and
    rows renormalised, then the layers are multiplied: entry (q, k) is how much token k flows into q.
    """
    rollout = None
    for a in maps:
        a = a.float().mean(1)  # (B, N, N)
        eye = torch.eye(a.shape[-1], device=a.device)
        a = residual * eye + (1 - residual) * a
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs at least one attention map")
    return rollout


def token_heat(model, batch: Batch, weights: Tensor) -> Tensor:
    """One weight per token (B, N) laid on the input's token grid: images (B, gh, gw), video
    (B, gt, gh, gw), audio (B, time patches, mel patches), text (B, N)."""
    p = model.patchers[batch.modality](batch.x, batch.lengths)
    return weights.reshape(weights.shape[0], *p.grid)
