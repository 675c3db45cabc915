"""Model logic behind the attention explorer (app) and the evaluation notebook; no UI library here.

Everything takes a loaded :class:`~workbench.model.OmniVec2` and :class:`~workbench.batch.Batch`es and
returns tensors or plain dicts:

* :func:`single_stream_attention`: every self-attention map of ``h(g(f(x)))`` for one batch;
* :func:`rollout_heat`: attention rollout through f then g, as one weight per input token on the
  input's grid (what the whole backbone looks at);
* :func:`layer_heat`: one module/layer/head's attention, averaged over queries, on the token grid;
* :func:`overlay`: a heat grid upsampled onto a grey picture, as an RGB array;
* :func:`collect_predictions`: predictions, targets and confidences of a whole split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from workbench.batch import Batch
from workbench.visualize import attention_rollout, token_heat


@torch.no_grad()
def single_stream_attention(model, batch: Batch, tasks: list[str] | None = None) -> dict[str, Tensor]:
    """``{"f.0": (B, H, N, N), ..., "g.0": ..., "head.image/digit.0": (B, H, 1+N, 1+N)}``."""
    model.eval()
    with model.capture_attention() as maps:
        model.forward_single(batch, tasks)
    return dict(maps)


def _backbone_layers(maps: dict[str, Tensor], modules: tuple[str, ...]) -> list[Tensor]:
    """The maps of ``modules`` in forward order (``f.0, f.1, ..., g.0, ...``)."""
    out = []
    for module in modules:
        keys = sorted((k for k in maps if k.split(".")[0] == module and k.split(".")[1].isdigit()),
                      key=lambda k: int(k.split(".")[1]))  # fmt: skip
        out += [maps[k] for k in keys]
    return out


def rollout_heat(model, batch: Batch, maps: dict[str, Tensor] | None = None, modules=("f", "g")) -> Tensor:
    """(B, *grid) how much each input token flows into the final features (rollout, averaged over queries)."""
    maps = maps if maps is not None else single_stream_attention(model, batch)
    roll = attention_rollout(_backbone_layers(maps, modules))  # (B, N, N)
    heat = _valid_mean(roll, model, batch)
    return token_heat(model, batch, heat)


def layer_heat(model, batch: Batch, maps: dict[str, Tensor], name: str, head: int | None = None) -> Tensor:
    """(B, *grid) attention received by each token in map ``name`` (one head, or the mean of heads).

    Heads with a leading class token (task heads) drop it, so the picture stays on the input grid.
    """
    a = maps[name].float()  # (B, H, Q, K)
    a = a.mean(1) if head is None else a[:, head]
    p = model.patchers[batch.modality](batch.x, batch.lengths)
    n = int(np.prod(p.grid))
    if a.shape[-1] == n + 1:  # class token first: keep what the class token attends to
        a = a[:, :1, 1:]
    heat = a.mean(1)  # (B, N)
    if p.padding is not None:
        heat = heat.masked_fill(p.padding, 0.0)
    return token_heat(model, batch, heat)


def _valid_mean(roll: Tensor, model, batch: Batch) -> Tensor:
    p = model.patchers[batch.modality](batch.x, batch.lengths)
    if p.padding is None:
        return roll.mean(1)
    valid = (~p.padding).float()  # (B, N)
    heat = (roll * valid[:, :, None]).sum(1) / valid.sum(1, keepdim=True)
    return heat * valid


def overlay(picture: np.ndarray | Tensor, heat: np.ndarray | Tensor, alpha: float = 0.55) -> np.ndarray:
    """A grey picture (H, W) in [0, 1] with a heat grid (gh, gw) upsampled onto it: (H, W, 3) uint8."""
    pic = np.asarray(picture.detach().cpu() if isinstance(picture, Tensor) else picture, dtype=np.float32)
    h = torch.as_tensor(
        np.asarray(heat.detach().cpu() if isinstance(heat, Tensor) else heat, dtype=np.float32)
    )
    h = torch.nn.functional.interpolate(h[None, None], size=pic.shape, mode="nearest")[0, 0].numpy()
    h = (h - h.min()) / (h.max() - h.min() + 1e-8)
    red = np.stack([h, 0.25 * h, 1 - h], -1)  # blue (cold) -> red (hot)
    rgb = (1 - alpha) * np.repeat(pic[..., None], 3, -1) + alpha * red * (
        0.35 + 0.65 * pic[..., None].clip(0.2, 1)
    )
    return (rgb.clip(0, 1) * 255).astype(np.uint8)


@torch.no_grad()
def collect_predictions(model, dataset, batch_size: int = 256) -> dict[str, Tensor]:
    """``{"pred", "y", "confidence", "digit"}`` for every item of a classification TaskDataset, in order."""
    from workbench.data import make_loader

    model.eval()
    out: dict[str, list[Tensor]] = {"pred": [], "y": [], "confidence": [], "digit": []}
    for batch in make_loader(dataset, batch_size, shuffle=False, seed=0, text_tokenizer=model.text_tokenizer):
        probs = model.forward_single(batch, [dataset.task])[dataset.task].float().softmax(-1)
        conf, pred = probs.max(-1)
        out["pred"].append(pred), out["y"].append(batch.y), out["confidence"].append(conf)
        out["digit"].append(batch.digit if batch.digit is not None else torch.full_like(batch.y, -1))
    return {k: torch.cat(v) for k, v in out.items()}
