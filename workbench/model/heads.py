"""Task heads h_mt (three variants for the ablation) and the masked-prediction decoders.

Every head set has the same call: ``heads(key, x, padding, coords) -> raw output`` where ``x`` is the
stream's features (B, N, w), ``key`` the task (``"image/digit"``). Raw outputs are logits (B, C) for
classification; for dense tasks either per-token values (B, N, numel) that the model unpatchifies onto
the modality's grid (``token_numel[key]`` given), or a flat (B, prod(shape)) vector predicted from the
pooled token (targets that are not pictures on the token grid).

* :class:`TaskSpecificHeads` (OmniVec2): one small ViT-Tiny-style transformer per (modality, task):
  project to ``head_dim``, prepend a CLS token, ``head_depth`` blocks, LayerNorm, output layer.
* :class:`UnifiedHead` (Uni-Perceiver ablation): ONE shared transformer for every task. Its pooled
  (CLS) feature is projected into a label space and scored by cosine similarity (learned temperature)
  against learned embeddings of the task's label names. The label table is keyed by label *name*, so
  tasks that share names (``digit`` "7" in every modality) share embeddings: every class of every task
  lives in one space. Uni-Perceiver encodes label text with its shared encoder; our labels are short
  symbols, so we learn their embeddings directly. Dense tasks cannot be scored against labels: they
  keep a minimal shared pixel output, one linear layer per output geometry (per-token numel), shared
  by every dense task with that geometry.
* :class:`AutoencoderHeads` (Table 12 rows 1-2, "the stage-1 setting without multimodal stages"): each
  task's head is built exactly like the stage-1 masked-prediction decoder trunk (linear to
  ``decoder_dim``, fixed positions, ``decoder_depth`` blocks, LayerNorm) plus a linear output (on the
  mean of the valid tokens, or per token for dense tasks). So an MAE encoder + its decoder are
  fine-tuned with a linear read-out; :meth:`OmniVec2.init_heads_from_decoders` copies the stage-1
  decoder's weights into them. The single-modality pre-training of those rows is a training schedule
  (stage 1 only), not a network change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.config import ModelConfig
from workbench.modalities import TaskSpec
from workbench.model.attention import Transformer
from workbench.model.masking import Masked, unshuffle
from workbench.model.patching import sincos_embedding


def _pad_cls(padding: Tensor | None) -> Tensor | None:
    return None if padding is None else F.pad(padding, (1, 0), value=False)  # CLS is never padding


def masked_mean(x: Tensor, padding: Tensor | None) -> Tensor:
    """Mean over the valid tokens: (B, N, D) -> (B, D)."""
    if padding is None:
        return x.mean(1)
    keep = (~padding).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1)


def _output_layer(task: TaskSpec, width: int, token_numel: int | None) -> nn.Linear:
    if task.kind == "classification":
        return nn.Linear(width, task.num_classes)
    return nn.Linear(width, token_numel or math.prod(task.shape))


class ViTHead(nn.Module):
    """ViT-Tiny-style head: proj (w -> head_dim), CLS token, blocks, LayerNorm, output layer.

    A classification read-out is ``model.head_pool``: ``mean`` (default) averages the valid token
    outputs (global average pooling; Beyer et al. 2022, "Better plain ViT baselines", find it trains
    faster than CLS), and the CLS token stays in the sequence as an attention register, so head
    attention maps and weights have one shape either way; ``cls`` reads the CLS token's output (ViT).
    Measured here (tiny preset, one task alone, 600 updates of 32): text/digit train accuracy 37% with
    mean vs 21% with CLS, audio/digit test 49% vs 44% (300 updates); image/digit on ``small`` equal.
    Full profile's stage 3 (6,000 updates, seed 0, test): ``cls`` took video motion from 99.6% to 67.4% and
    audio digit from 94.5% to 90.0%, text digit 98.25% vs 98.75% (seed 1: mean of 7 92.4% vs 95.2%).
    """

    def __init__(self, name: str, in_dim: int, cfg: ModelConfig, task: TaskSpec, token_numel: int | None):
        super().__init__()
        self.pool = cfg.head_pool
        self.proj = nn.Linear(in_dim, cfg.head_dim)
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.head_dim) * 0.02)
        self.body = Transformer(
            name, cfg.head_dim, cfg.head_depth, cfg.head_heads, cfg.mlp_ratio, cfg.dropout
        )
        self.out = _output_layer(task, cfg.head_dim, token_numel)
        self.per_token = task.kind == "dense" and token_numel is not None

    def forward(self, x: Tensor, padding: Tensor | None, coords: Tensor) -> Tensor:
        B = x.shape[0]
        x = torch.cat([self.cls.expand(B, -1, -1).to(x.dtype), self.proj(x)], dim=1)  # (B, 1+N, head_dim)
        x = self.body(x, _pad_cls(padding))
        if self.per_token:
            return self.out(x[:, 1:])  # (B, N, numel)
        return self.out(x[:, 0] if self.pool == "cls" else masked_mean(x[:, 1:], padding))  # (B, out)


class TaskSpecificHeads(nn.ModuleDict):
    """``{"modality/task": ViTHead}``; attention modules named ``head.<modality/task>.<layer>``."""

    def __init__(
        self, in_dim: int, cfg: ModelConfig, tasks: list[TaskSpec], token_numel: dict[str, int | None]
    ):
        super().__init__({t.key: ViTHead(f"head.{t.key}", in_dim, cfg, t, token_numel[t.key]) for t in tasks})

    def forward(self, key: str, x: Tensor, padding: Tensor | None, coords: Tensor) -> Tensor:
        return self[key](x, padding, coords)


class UnifiedHead(nn.Module):
    """One shared transformer; classification = cosine scores against shared label-name embeddings."""

    def __init__(
        self, in_dim: int, cfg: ModelConfig, tasks: list[TaskSpec], token_numel: dict[str, int | None]
    ):
        super().__init__()
        D = cfg.head_dim
        self.proj = nn.Linear(in_dim, D)
        self.cls = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.body = Transformer("head", D, cfg.head_depth, cfg.head_heads, cfg.mlp_ratio, cfg.dropout)
        self.to_space = nn.Linear(D, D)  # pooled feature -> the label space
        names: list[str] = []
        for t in tasks:
            names += [n for n in t.labels if n not in names]
        self.label_names = names
        self.label_index = {t.key: [names.index(n) for n in t.labels] for t in tasks}
        self.label_embed = nn.Parameter(torch.randn(max(len(names), 1), D) * 0.02)  # (labels, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # learned temperature (CLIP)
        self.kind = {t.key: t.kind for t in tasks}
        self.per_token = {t.key: token_numel[t.key] is not None for t in tasks}
        self.geometry: dict[
            str, str
        ] = {}  # dense task -> its pixel output ("token<numel>" | "pooled<numel>")
        sizes: dict[str, int] = {}
        for t in tasks:
            if t.kind == "dense":
                n = token_numel[t.key]
                geometry = f"token{n}" if n else f"pooled{math.prod(t.shape)}"
                self.geometry[t.key], sizes[geometry] = geometry, n or math.prod(t.shape)
        self.pixels = nn.ModuleDict({g: nn.Linear(D, n) for g, n in sizes.items()})

    def forward(self, key: str, x: Tensor, padding: Tensor | None, coords: Tensor) -> Tensor:
        B = x.shape[0]
        x = torch.cat([self.cls.expand(B, -1, -1).to(x.dtype), self.proj(x)], dim=1)  # (B, 1+N, D)
        x = self.body(x, _pad_cls(padding))
        if self.kind[key] == "dense":
            out = self.pixels[self.geometry[key]]
            return out(x[:, 1:]) if self.per_token[key] else out(x[:, 0])
        feat = F.normalize(self.to_space(x[:, 0]), dim=-1)  # (B, D)
        idx = torch.as_tensor(self.label_index[key], device=x.device)
        labels = F.normalize(self.label_embed[idx], dim=-1).to(feat.dtype)  # (C, D)
        return self.logit_scale.exp() * feat @ labels.t()  # (B, C)


class DecoderTrunk(nn.Module):
    """The stage-1 decoder's body: linear to decoder_dim, fixed positions, blocks, LayerNorm."""

    def __init__(self, name: str, in_dim: int, cfg: ModelConfig):
        super().__init__()
        self.dim = cfg.decoder_dim
        self.embed = nn.Linear(in_dim, cfg.decoder_dim)
        self.body = Transformer(
            name, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.mlp_ratio, cfg.dropout
        )


class AutoencoderHead(DecoderTrunk):
    def __init__(self, name: str, in_dim: int, cfg: ModelConfig, task: TaskSpec, token_numel: int | None):
        super().__init__(name, in_dim, cfg)
        self.out = _output_layer(task, cfg.decoder_dim, token_numel)
        self.per_token = task.kind == "dense" and token_numel is not None

    def forward(self, x: Tensor, padding: Tensor | None, coords: Tensor) -> Tensor:
        x = self.embed(x) + sincos_embedding(coords, self.dim).to(x.dtype)  # (B, N, decoder_dim)
        x = self.body(x, padding)
        return self.out(x) if self.per_token else self.out(masked_mean(x, padding))


class AutoencoderHeads(nn.ModuleDict):
    """``{"modality/task": AutoencoderHead}``; attention modules named ``head.<modality/task>.<layer>``."""

    def __init__(
        self, in_dim: int, cfg: ModelConfig, tasks: list[TaskSpec], token_numel: dict[str, int | None]
    ):
        super().__init__(
            {t.key: AutoencoderHead(f"head.{t.key}", in_dim, cfg, t, token_numel[t.key]) for t in tasks}
        )

    def forward(self, key: str, x: Tensor, padding: Tensor | None, coords: Tensor) -> Tensor:
        return self[key](x, padding, coords)


class DenseRefiner(nn.Module):
    """Input-guided refinement of a dense prediction that lies on its input's pixel grid (``image/denoise``).

    The head predicts each token's pixels, so its picture is made of ``patch x patch`` tiles, and the
    tokens of a shift-tolerant stem (max-pooled CNN features) no longer say exactly where each stroke
    sits. The refiner is the head's output layer at full resolution: 3x3 convolutions (GELU) read the
    coarse prediction beside the task's own input and add a correction, so fine detail comes from the
    input, and what the input cannot show (under an occluder, in heavy noise) from the network's
    context. The last convolution starts at zero: an untrained refiner is the identity. It has the
    input skip of U-Net-style dense decoders (Ronneberger et al. 2015; UNETR, Hatamizadeh et al. 2022).
    """

    def __init__(self, channels: int, width: int, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(2 * channels, width, 3, padding=1), nn.GELU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.net[-1].weight)

    def forward(self, coarse: Tensor, x: Tensor) -> Tensor:
        """coarse (B, C, H, W) prediction, x (B, C, H, W) the task's input -> the refined prediction."""
        if x.shape != coarse.shape:
            raise ValueError(f"the refiner needs the input on the prediction's grid: {tuple(x.shape)} vs "
                             f"{tuple(coarse.shape)}")  # fmt: skip
        return coarse + self.net(torch.cat([coarse, x.to(coarse.dtype)], dim=1))


HEADS = {"specific": TaskSpecificHeads, "unified": UnifiedHead, "autoencoder": AutoencoderHeads}


class MaskedDecoder(DecoderTrunk):
    """MAE-style light decoder: encoded visible tokens -> a prediction for every token of the input.

    Signals: the encoded kept tokens are put back in original order with a learned mask token in every
    removed slot (:func:`~workbench.model.masking.unshuffle`), positions are added, and a per-token
    linear layer predicts the patch values. Discrete inputs (text) were corrupted, not dropped: the
    decoder sees every position and predicts ids (logits over the vocabulary).
    """

    def __init__(self, name: str, in_dim: int, cfg: ModelConfig, out_dim: int, discrete: bool):
        super().__init__(name, in_dim, cfg)
        self.mask_token = None if discrete else nn.Parameter(torch.randn(1, 1, cfg.decoder_dim) * 0.02)
        self.out = nn.Linear(cfg.decoder_dim, out_dim)

    def forward(self, x: Tensor, coords: Tensor, padding: Tensor | None, masked: Masked | None) -> Tensor:
        """x (B, K, in_dim) encoded visible tokens; padding (B, N) of the full input -> (B, N, out_dim)."""
        x = self.embed(x)  # (B, K, decoder_dim)
        if masked is not None:
            x = unshuffle(x, masked.kept_padding, self.mask_token, masked.ids_restore)  # (B, N, decoder_dim)
        x = x + sincos_embedding(coords, self.dim).to(x.dtype)
        return self.out(self.body(x, padding))
