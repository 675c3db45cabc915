"""DeepSense-v2's network (METHOD.md section 4; seed ``000_...txt``): one encoder per modality, fused by cross-attention.

The seed describes "a multi-branch transformer ... integrating specialized encoders ... Each modality
encoder processes its respective input stream before fusion via a cross-attention mechanism". The
encoders (:data:`ENCODERS`, the one place a modality is named)::

    image  ImageEncoder   HierarchicalViT: 4x4-pixel patches, stages of pre-norm ViT blocks, Swin's patch
                          merging between stages (2x2 neighbours -> half the grid, twice the width).
                          Global attention in every stage: on 28x28 digits (8x8 tokens once padded to 32)
                          Swin's windows would save nothing. Mean of the last stage's tokens = pooled.
    audio  AudioEncoder   Conformer (Gulati et al. 2020) on the workbench's log-mel spectrogram
                          (model/audio.py), ``deepsense.audio_stride`` frames stacked per token (a linear
                          stand-in for the paper's 4x convolutional subsampling). Masked mean = pooled.
    text   TextEncoder    decoder-only (GPT-style) blocks with CAUSAL self-attention over token ids. The
                          last valid token's features = pooled (CLIP's text-transformer habit): under a
                          causal mask it is the only position that has read the whole text.
    video  VideoEncoder   the hierarchical ViT on every frame, one vector per frame plus a time position;
                          temporal mean pooling = pooled. No generative objective (contrastive only).

:class:`DeepSense` composes them as "align before fuse" (ALBEF, Li et al. 2021; CoCa, Yu et al. 2022)::

    z_m     = normalise(E_m pooled(enc_m(x_m)))          (B, w)      contrastive embedding, retrieval
    t_m     = P_m enc_m(x_m)                             (B, N, w)   fusion tokens, w = model.fc_dims[-1]
    fused_i = Fuse_i(t_i, context = t_j)                 (B, N, w)   stream i's queries attend to stream j
    pred_i  = H_i(fused_i)                                           stream i's generative objective

Losses of one label-aligned pair (a, b), unweighted, as a dict (``workbench/deepsense.py`` weights them):

* ``contrastive``: symmetric InfoNCE between ``z_a`` and ``z_b`` with a learned temperature
  (:func:`info_nce`).
* ``image`` / ``audio``: masked reconstruction, SimMIM-style (Xie et al. 2022): a random share
  (``deepsense.mask_ratio``) of *units* is replaced by a learned mask token at the input and a linear
  head predicts the unit from the fused features; L2 on the masked units only. Image units are the last
  stage's tokens (an 8x8-pixel block for 4-pixel patches and 2 stages): masking whole units keeps the
  answer out of every token that predicts it. Image targets are per-unit normalised pixels (MAE's
  ``norm_pix`` target, as in the rest of the workbench); audio targets are the stacked log-mel frames of
  the token (already normalised per utterance). Tokens are replaced, not dropped (as MAE does), because a
  hierarchical ViT and a convolution need the full grid. The seed reconstructs the *waveform*; we
  reconstruct the log-mel frames the encoder reads, which carry what a 16 kHz waveform target would
  add only at many times the cost.
* ``text``: next-token language modelling, NOT masked LM (the seed's wording). A decoder-only encoder
  with a causal mask cannot use a [MASK] in the middle (the positions after it cannot be seen), so
  masked LM degenerates into next-token prediction with most targets thrown away; next-token LM is the
  objective a causal transformer is built for (GPT; CoCa's captioning loss), trains on every position,
  and keeps training and inference inputs identical (no [MASK] token).

The contrastive terms use the *clean* (unmasked) encodings; the masked terms run the image or audio
encoder a second time on the masked input (two passes; FLIP's contrastive-on-masked-inputs would save
one at some accuracy). The fusion context is the partner's clean encoding. A fusion layer is
cross-attention + MLP without self-attention, so the fused text stays causal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.batch import Batch
from workbench.config import DEEPSENSE_PAIR_SEP, Config
from workbench.errors import MediaError
from workbench.modalities import IMAGE_SIZE, VIDEO_FRAMES, VIDEO_SIZE
from workbench.model.attention import Attention, CrossAttention, Mlp, Transformer
from workbench.model.heads import masked_mean
from workbench.model.masking import random_masking
from workbench.model.patching import AudioPatcher, TextPatcher, grid_coords, normalise_patches, patchify_2d
from workbench.model.patching import sincos_embedding as _sincos


def sincos(n: int, dim: int) -> Tensor:
    """(n, dim) fixed 1-D sin-cos positions."""
    return _sincos(grid_coords((n,)), dim)


def parse_pairs(pairs: Sequence[str]) -> list[tuple[str, str]]:
    """``["text->image", ...]`` -> ``[("text", "image"), ...]`` (query, gallery); validated by the config."""
    return [tuple(p.split(DEEPSENSE_PAIR_SEP)) for p in pairs]  # type: ignore[misc]


# ------------------------------------------------------------------------------------------ contract
@dataclass
class Inputs:
    """An encoder's input after its parameter-free preparation (computed once, encoded clean and masked)."""

    values: Tensor  # what the encoder embeds: patches (B, N, P), stacked frames (B, N, P), ids (B, N)
    padding: Tensor | None  # (B, N) True = padding
    target: Tensor | None = None  # (B, U, P) reconstruction target per maskable unit (masked objective)
    unit_padding: Tensor | None = None  # (B, U) True = padding unit (never masked, never scored)


@dataclass
class Encoded:
    tokens: Tensor  # (B, N, width) output sequence; for a masked objective, one token per unit
    padding: Tensor | None  # (B, N) True = padding
    pooled: Tensor  # (B, width) one vector per sample


class Encoder(nn.Module):
    """Base class. ``objective``: "masked" (reconstruct masked units) | "lm" (next token) | None."""

    objective: str | None = None
    width = 0  # output width
    target_numel = 0  # values per unit (masked) or vocabulary size (lm)

    def inputs(self, x: Tensor, lengths: Tensor | None = None) -> Inputs:
        raise NotImplementedError

    def encode(self, inp: Inputs, mask: Tensor | None = None) -> Encoded:
        """``mask`` (B, U) bool, True = unit replaced by the mask token (masked objective only)."""
        raise NotImplementedError

    def forward(self, x: Tensor, lengths: Tensor | None = None, mask: Tensor | None = None) -> Encoded:
        return self.encode(self.inputs(x, lengths), mask)


def _no_mask(name: str, mask: Tensor | None) -> None:
    if mask is not None:
        raise ValueError(f"the {name} encoder has no masked objective")


# ------------------------------------------------------------------------------------------ image, video
class PatchMerging(nn.Module):
    """Swin's downsampling (Liu et al. 2021): concatenate 2x2 neighbours (4C), LayerNorm, linear to 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        B, _, C = x.shape
        H, W = grid
        x = x.view(B, H, W, C)
        quads = [
            x[:, 0::2, 0::2],
            x[:, 1::2, 0::2],
            x[:, 0::2, 1::2],
            x[:, 1::2, 1::2],
        ]  # 4 x (B, H/2, W/2, C)
        x = torch.cat(quads, -1).view(B, -1, 4 * C)  # (B, HW/4, 4C)
        return self.reduction(self.norm(x)), (H // 2, W // 2)  # (B, HW/4, 2C)


class HierarchicalViT(nn.Module):
    """(B, 1, side, side) pixels -> (B, U, width) tokens of the last stage.

    Images are zero-padded (before standardising: padding looks like background) to a multiple of
    ``unit = patch * 2^(stages-1)`` pixels, so every merge halves an even grid (Swin pads odd grids
    inside each merge; padding once up front is the same for a fixed input size). 28x28 with 4-pixel
    patches and 2 stages: padded to 32, 8x8 tokens of width dim, then 4x4 of width 2 dim. Fixed 2-D
    sin-cos positions are added at the first stage (Swin's relative bias lives in windows, which we omit).
    """

    def __init__(self, name: str, side: int, patch: int, dim: int, depth: int, heads: int, stages: int,
                 mlp_ratio: float, dropout: float, norm: Sequence[float], masked: bool = True):  # fmt: skip
        super().__init__()
        self.patch, self.stages_n = patch, stages
        self.unit = patch * 2 ** (stages - 1)  # pixels per side of one last-stage token (a maskable unit)
        self.padded = math.ceil(side / self.unit) * self.unit
        self.grid = self.padded // patch  # first-stage grid side
        self.mean, self.std = norm
        self.patch_embed = nn.Linear(patch * patch, dim)  # a stride-p convolution, as patchify + linear
        self.register_buffer("pos", _sincos(grid_coords((self.grid, self.grid)), dim), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if masked else None  # SimMIM's, if masked
        if masked:
            nn.init.normal_(self.mask_token, std=0.02)
        self.stages = nn.ModuleList(
            Transformer(f"{name}.s{s}", dim * 2**s, depth, heads, mlp_ratio, dropout) for s in range(stages)
        )
        self.merges = nn.ModuleList(PatchMerging(dim * 2**s) for s in range(stages - 1))
        self.width = dim * 2 ** (stages - 1)
        self.units_per_side = self.grid // 2 ** (stages - 1)

    def _pad(self, x: Tensor) -> Tensor:
        extra = self.padded - x.shape[-1]
        return F.pad(x.float(), (extra // 2, extra - extra // 2, extra // 2, extra - extra // 2))

    def patches(self, x: Tensor) -> Tensor:
        """(B, 1, side, side) -> standardised first-stage patches (B, grid^2, patch^2)."""
        return patchify_2d((self._pad(x) - self.mean) / self.std, self.patch)

    def units(self, x: Tensor) -> Tensor:
        """(B, 1, side, side) -> per-unit normalised pixels (B, U, unit^2): the masked-prediction target."""
        return normalise_patches(patchify_2d(self._pad(x), self.unit))

    def forward(self, patches: Tensor, mask: Tensor | None = None) -> Tensor:
        """patches (B, N, patch^2), mask (B, U) bool (True = masked unit) -> (B, U, width)."""
        x = self.patch_embed(patches)  # (B, N, dim)
        B = x.shape[0]
        if mask is not None:  # a unit covers r x r first-stage tokens
            r, g = 2 ** (self.stages_n - 1), self.units_per_side
            m = mask.view(B, g, g).repeat_interleave(r, 1).repeat_interleave(r, 2).reshape(B, -1, 1)
            x = torch.where(m, self.mask_token.to(x.dtype), x)  # SimMIM: replace, keep the grid
        x = x + self.pos
        grid = (self.grid, self.grid)
        for s, stage in enumerate(self.stages):
            if s:
                x, grid = self.merges[s - 1](x, grid)
            x = stage(x)  # blocks + LayerNorm
        return x


class ImageEncoder(Encoder):
    """(B, 1, 28, 28) -> (B, U, width): the hierarchical ViT; pooled = mean of the last stage."""

    objective = "masked"

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.vit = HierarchicalViT("image", IMAGE_SIZE, m.patch_size, m.dim, m.depth_f, m.heads,
                                   cfg.deepsense.image_stages, m.mlp_ratio, m.dropout, m.image_norm)  # fmt: skip
        self.width, self.target_numel = self.vit.width, self.vit.unit**2

    def inputs(self, x: Tensor, lengths: Tensor | None = None) -> Inputs:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise MediaError(
                f"an image batch must be (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}); got {tuple(x.shape)}"
            )
        return Inputs(self.vit.patches(x), None, self.vit.units(x), None)

    def encode(self, inp: Inputs, mask: Tensor | None = None) -> Encoded:
        tokens = self.vit(inp.values, mask)  # (B, U, width)
        return Encoded(tokens, None, tokens.mean(1))


class VideoEncoder(Encoder):
    """(B, T, 1, 32, 32) -> one token per frame (B, T, width): the hierarchical ViT on every frame
    (``model.video_patch`` pixels per patch), mean over its tokens, plus a time position; pooled =
    temporal mean. Fewer than 8 frames are accepted."""

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.vit = HierarchicalViT("video", VIDEO_SIZE, m.video_patch, m.dim, m.depth_f, m.heads,
                                   cfg.deepsense.image_stages, m.mlp_ratio, m.dropout, m.video_norm,
                                   masked=False)  # fmt: skip
        self.width = self.vit.width
        self.register_buffer("time_pos", sincos(VIDEO_FRAMES, self.width), persistent=False)

    def inputs(self, x: Tensor, lengths: Tensor | None = None) -> Inputs:
        if (
            x.ndim != 5
            or not 0 < x.shape[1] <= VIDEO_FRAMES
            or tuple(x.shape[2:]) != (1, VIDEO_SIZE, VIDEO_SIZE)
        ):
            raise MediaError(
                f"a video batch must be (B, T<={VIDEO_FRAMES}, 1, {VIDEO_SIZE}, {VIDEO_SIZE}); got {tuple(x.shape)}"
            )
        B, T = x.shape[:2]
        patches = self.vit.patches(x.flatten(0, 1))  # (B*T, N, P)
        return Inputs(patches.view(B, T, *patches.shape[1:]), None)  # (B, T, N, P)

    def encode(self, inp: Inputs, mask: Tensor | None = None) -> Encoded:
        _no_mask("video", mask)
        B, T = inp.values.shape[:2]
        frames = self.vit(inp.values.flatten(0, 1)).mean(1).view(B, T, -1)  # (B, T, width)
        return Encoded(frames + self.time_pos[:T], None, frames.mean(1))  # temporal mean pooling


# ------------------------------------------------------------------------------------------ audio
class FeedForward(nn.Module):
    """Conformer feed-forward module: LN, linear (x mlp_ratio), SiLU (Swish), dropout, linear, dropout."""

    def __init__(self, dim: int, ratio: float, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, int(dim * ratio)), nn.SiLU(),
                                 nn.Dropout(dropout), nn.Linear(int(dim * ratio), dim), nn.Dropout(dropout))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvModule(nn.Module):
    """Conformer convolution module: LN, pointwise (2C) + GLU, depthwise conv, norm, SiLU, pointwise, dropout.

    Padding is respected: padded frames are zeroed before the depthwise convolution (so nothing leaks
    into valid frames through the kernel) and ``norm="batch"`` takes its statistics over valid frames
    only (BatchNorm1d on the (n_valid, C) rows). A valid frame's output then depends on the padding
    neither in amount nor in content. ``norm="layer"`` (per frame) needs no special care.
    """

    def __init__(self, dim: int, kernel: int, norm: str = "batch", dropout: float = 0.0):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)  # a 1x1 convolution
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.BatchNorm1d(dim) if norm == "batch" else nn.LayerNorm(dim)
        self.pointwise_out, self.drop = nn.Linear(dim, dim), nn.Dropout(dropout)

    def _norm(self, y: Tensor, padding: Tensor | None) -> Tensor:
        if isinstance(self.norm, nn.LayerNorm):
            return self.norm(y)
        if padding is None:
            return self.norm(y.flatten(0, 1)).view_as(y)  # (B*T, C): BatchNorm over every frame
        out = torch.zeros_like(y)
        out[~padding] = self.norm(y[~padding])  # (n_valid, C): statistics over valid frames only
        return out

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        """x (B, T, C), padding (B, T) True = padding -> (B, T, C) (the residual branch)."""
        y = F.glu(self.pointwise_in(self.norm_in(x)), dim=-1)  # (B, T, C)
        if padding is not None:
            y = y.masked_fill(padding.unsqueeze(-1), 0.0)
        y = self.depthwise(y.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        return self.drop(self.pointwise_out(F.silu(self._norm(y, padding))))


class ConformerBlock(nn.Module):
    """Macaron block: x + FF/2, x + MHSA, x + Conv, x + FF/2, then LayerNorm (Gulati et al. 2020, eq. 1).

    Self-attention is the workbench's :class:`Attention` (SDPA, key padding mask, capture/silencing by
    name ``audio.<i>``) with absolute sin-cos positions added at the input instead of the paper's
    relative positional encoding; the depthwise convolution supplies relative position too.
    """

    def __init__(self, name: str, dim: int, heads: int, kernel: int, mlp_ratio: float, dropout: float,
                 norm: str = "batch"):  # fmt: skip
        super().__init__()
        self.ff1, self.ff2 = FeedForward(dim, mlp_ratio, dropout), FeedForward(dim, mlp_ratio, dropout)
        self.norm_attn, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout=dropout)
        self.attn.name = name
        self.conv = ConvModule(dim, kernel, norm, dropout)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(self.norm_attn(x), key_padding_mask=padding)
        x = x + self.conv(x, padding)
        x = x + 0.5 * self.ff2(x)
        return self.norm_out(x)


class AudioEncoder(Encoder):
    """(B, L) waveform + lengths -> log-mel (B, frames, n_mels) -> tokens of ``audio_stride`` stacked
    frames (B, N, stride * n_mels) -> linear -> Conformer blocks -> (B, N, dim).

    The log-mel, its padding mask and the length checks are the workbench's :class:`AudioPatcher` with
    a patch of (stride frames x every mel bin). Each token is one maskable unit; its target is its frames.
    """

    objective = "masked"

    def __init__(self, cfg: Config):
        super().__init__()
        m, d = cfg.model, cfg.deepsense
        self.patcher = AudioPatcher(replace(m, audio_patch=[d.audio_stride, m.n_mels]))
        self.target_numel = self.patcher.patch_numel
        self.embed = nn.Linear(self.target_numel, m.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, m.dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", sincos(self.patcher.max_tokens, m.dim), persistent=False)
        self.blocks = nn.ModuleList(
            ConformerBlock(f"audio.{i}", m.dim, m.heads, d.conv_kernel, m.mlp_ratio, m.dropout, d.conv_norm)
            for i in range(m.depth_f)
        )
        self.width = m.dim

    def inputs(self, x: Tensor, lengths: Tensor | None = None) -> Inputs:
        p = self.patcher(x, lengths)  # values (B, N, stride * n_mels), padding (B, N)
        return Inputs(p.values, p.padding, p.values, p.padding)

    def encode(self, inp: Inputs, mask: Tensor | None = None) -> Encoded:
        x = self.embed(inp.values)  # (B, N, dim)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = x + self.pos[: x.shape[1]]
        for block in self.blocks:
            x = block(x, inp.padding)
        return Encoded(x, inp.padding, masked_mean(x, inp.padding))


# ------------------------------------------------------------------------------------------ text
class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t only (nanoGPT).

    Text is right-padded, so a valid position never sees padding: the causal mask alone is a correct
    padding mask for every valid query (padded positions' outputs are never read).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv, self.proj, self.drop = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        h = self.heads
        q, k, v = self.qkv(x).view(B, T, 3, h, C // h).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, hd)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, h, T, hd)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class CausalBlock(nn.Module):
    """GPT-2 block: x + causal attn(LN(x)), then x + GELU MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), CausalSelfAttention(dim, heads, dropout)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_ratio, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextEncoder(Encoder):
    """(B, N) token ids + lengths -> (B, N, dim) causal features; pooled = the last valid token's features.

    Token embedding + fixed 1-D sin-cos positions, ``model.depth_f`` causal blocks, final LayerNorm.
    Ids, lengths and the vocabulary are checked by the workbench's :class:`TextPatcher`.
    """

    objective = "lm"

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.patcher = TextPatcher(m)
        self.embed = nn.Embedding(m.text_vocab_size, m.dim)
        # GPT-2's std 0.02, not nn.Embedding's N(0, 1): ids never seen in training (the test split's phrasings
        # are new, DATA_CARD.md) then stay quiet instead of swamping the sentence. Measured with a digit probe
        # (tiny, 150 updates, 3 seeds): test accuracy 0.38-0.39 against 0.27-0.28 with N(0, 1) rows.
        nn.init.normal_(self.embed.weight, std=0.02)
        self.register_buffer("pos", sincos(m.max_text_tokens, m.dim), persistent=False)
        self.blocks = nn.ModuleList(
            CausalBlock(m.dim, m.heads, m.mlp_ratio, m.dropout) for _ in range(m.depth_f)
        )
        self.norm = nn.LayerNorm(m.dim)
        self.width, self.target_numel = m.dim, m.text_vocab_size

    def inputs(self, x: Tensor, lengths: Tensor | None = None) -> Inputs:
        p = self.patcher(x, lengths)  # ids (B, N) cut to the longest row, padding (B, N)
        return Inputs(p.values, p.padding)

    def encode(self, inp: Inputs, mask: Tensor | None = None) -> Encoded:
        _no_mask("text", mask)
        ids = inp.values
        B, N = ids.shape
        x = self.embed(ids) + self.pos[:N]  # (B, N, dim)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        last = (
            torch.full((B,), N - 1, device=ids.device) if inp.padding is None else (~inp.padding).sum(1) - 1
        )
        return Encoded(x, inp.padding, x[torch.arange(B, device=ids.device), last])


# The modality registry of DeepSense-v2: everything below iterates over it.
ENCODERS: dict[str, type[Encoder]] = {
    "image": ImageEncoder,
    "audio": AudioEncoder,
    "text": TextEncoder,
    "video": VideoEncoder,
}


# ------------------------------------------------------------------------------------------ fusion
class FusionLayer(nn.Module):
    """x + cross-attn(LN x, LN context) (the workbench's :class:`CrossAttention`, OmniVec2's A step),
    then x + MLP(LN x). No self-attention: every position is fused on its own, so causal text stays causal."""

    def __init__(self, name: str, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.cross = CrossAttention(name, dim, heads, dropout=dropout)
        self.norm, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_ratio, dropout)

    def forward(self, x: Tensor, context: Tensor, context_padding: Tensor | None = None) -> Tensor:
        x = self.cross(x, context, context_padding)  # (B, N, dim)
        return x + self.mlp(self.norm(x))


class Fusion(nn.Module):
    """``depth`` fusion layers (attention names ``fuse.<modality>.<i>``) and a final LayerNorm."""

    def __init__(self, name: str, dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            FusionLayer(f"{name}.{i}", dim, heads, mlp_ratio, dropout) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, context_padding: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, context, context_padding)
        return self.norm(x)


# ------------------------------------------------------------------------------------------ losses
def info_nce(
    za: Tensor,
    zb: Tensor,
    logit_scale: Tensor,
    labels_a: Tensor | None = None,
    labels_b: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021) between L2-normalised za (Ba, D) and zb (Bb, D).

    ``logits = exp(logit_scale) * za @ zb.T``; the loss is the mean of the a->b (rows) and b->a
    (columns) terms. Without labels the positives are the diagonal (row i <-> column i; CLIP, needs
    Ba == Bb): each term is a cross-entropy. With labels every item of the other side with the same
    label is a positive, and a row's loss is the mean over its positives of ``-log softmax`` (SupCon's
    L_out, Khosla et al. 2020; UniCL, Yang et al. 2022): on label-aligned pairs the other same-digit
    items of a batch are as right as the partner, so pushing them away would be noise. Rows without a
    positive are left out.
    """
    logits = logit_scale.exp() * za @ zb.T  # (Ba, Bb)
    if labels_a is None or labels_b is None:
        pos = torch.eye(za.shape[0], zb.shape[0], dtype=torch.bool, device=za.device)
    else:
        pos = labels_a[:, None] == labels_b[None, :]  # (Ba, Bb)

    def side(lg: Tensor, p: Tensor) -> Tensor:
        has = p.any(-1)
        nll = -(lg.log_softmax(-1) * p).sum(-1) / p.sum(-1).clamp(min=1)  # (rows,)
        return nll[has].mean()

    return 0.5 * (side(logits, pos) + side(logits.T, pos.T))


# ------------------------------------------------------------------------------------------ the model
class DeepSense(nn.Module):
    """Encoders for every modality of ``cfg.deepsense.pairs``, projections, fusion and objective heads.

    ``objectives``: the modalities whose generative objective trains (default: those whose encoder has
    one and whose ``deepsense.loss_weights`` entry is > 0). Only they get a fusion stack and a head, and
    only modalities that take part in fusion get fusion-token projections, so every parameter trains.
    """

    def __init__(self, cfg: Config, objectives: Sequence[str] | None = None):
        super().__init__()
        ds, m = cfg.deepsense, cfg.model
        self.pairs = parse_pairs(ds.pairs)
        self.modalities = list(dict.fromkeys(x for pair in self.pairs for x in pair))
        self.encoders = nn.ModuleDict({x: ENCODERS[x](cfg) for x in self.modalities})
        if objectives is None:
            objectives = [x for x in self.modalities
                          if self.encoders[x].objective and ds.loss_weights.get(x, 0.0) > 0]  # fmt: skip
        self.objectives = list(objectives)
        fused = {x for pair in self.pairs if set(pair) & set(self.objectives) for x in pair}
        w = m.fc_dims[-1]
        self.width = w
        self.embed_proj = nn.ModuleDict(
            {x: nn.Linear(e.width, w, bias=False) for x, e in self.encoders.items()}
        )
        self.token_proj = nn.ModuleDict(
            {x: nn.Linear(self.encoders[x].width, w) for x in self.modalities if x in fused}
        )
        self.fusion = nn.ModuleDict(
            {x: Fusion(f"fuse.{x}", w, m.depth_g, m.heads, m.mlp_ratio, m.dropout) for x in self.objectives}
        )
        self.heads = nn.ModuleDict({x: nn.Linear(w, self.encoders[x].target_numel) for x in self.objectives})
        # CLIP's learned temperature: a log-scale, clamped to [0, log max_logit_scale] after each update.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / ds.temperature)))
        self.max_log_scale = math.log(ds.max_logit_scale)
        self.mask_ratio = dict(ds.mask_ratio)
        self.positives = ds.positives

    # -------------------------------------------------------------------------------- named stages
    def embed(self, batch: Batch) -> Tensor:
        """(B, w) L2-normalised contrastive embedding of a single-modality batch (retrieval)."""
        enc = self.encoders[batch.modality](batch.x, batch.lengths)
        return F.normalize(self.embed_proj[batch.modality](enc.pooled), dim=-1)

    def fuse(self, modality: str, tokens: Tensor, context: Encoded, context_modality: str) -> Tensor:
        """``modality``'s encoder tokens (B, N, width) attend to the partner's encoding -> (B, N, w)."""
        ctx = self.token_proj[context_modality](context.tokens)  # (B, K, w)
        return self.fusion[modality](self.token_proj[modality](tokens), ctx, context.padding)

    def forward_contrastive(self, a: Batch, ea: Encoded, b: Batch, eb: Encoded) -> Tensor:
        za = F.normalize(self.embed_proj[a.modality](ea.pooled), dim=-1)  # (B, w)
        zb = F.normalize(self.embed_proj[b.modality](eb.pooled), dim=-1)
        if self.positives == "pair":
            return info_nce(za, zb, self.logit_scale)
        if a.digit is None or b.digit is None:
            raise ValueError("deepsense.positives=label needs batches that know their digit (Batch.digit)")
        return info_nce(za, zb, self.logit_scale, a.digit, b.digit)

    def forward_generative(
        self, batch: Batch, inp: Inputs, clean: Encoded, partner: str, context: Encoded
    ) -> Tensor:
        """The stream's own objective, predicted from its features fused with the partner's."""
        m = batch.modality
        enc = self.encoders[m]
        if enc.objective == "masked":
            # (B, U) 0 keep, 1 remove (padding units are never removed)
            mask = random_masking(inp.target, self.mask_ratio[m], inp.unit_padding).mask
            tokens = enc.encode(inp, mask.bool()).tokens  # (B, U, width)
            pred = self.heads[m](self.fuse(m, tokens, context, partner))  # (B, U, P)
            per_unit = (pred.float() - inp.target.float()).pow(2).mean(-1)  # (B, U)
            return (per_unit * mask).sum() / mask.sum().clamp(min=1)
        # next-token LM: position t predicts token t+1 (padding targets are ignored)
        logits = self.heads[m](self.fuse(m, clean.tokens, context, partner))[:, :-1]  # (B, N-1, V)
        targets = inp.values[:, 1:]
        if inp.padding is not None:
            targets = targets.masked_fill(inp.padding[:, 1:], -100)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        return loss / (targets != -100).sum().clamp(min=1)

    def forward(self, a: Batch, b: Batch) -> dict[str, Tensor]:
        """Unweighted losses of one aligned pair: ``contrastive``, and ``<modality>`` for each stream
        with a generative objective (e.g. ``{"contrastive", "text", "image"}`` for text + image)."""
        batches = (a, b)
        ins = [self.encoders[x.modality].inputs(x.x, x.lengths) for x in batches]
        clean = [self.encoders[x.modality].encode(inp) for x, inp in zip(batches, ins)]
        losses = {"contrastive": self.forward_contrastive(a, clean[0], b, clean[1])}
        for i, j in ((0, 1), (1, 0)):
            m = batches[i].modality
            if m in self.fusion:
                losses[m] = self.forward_generative(
                    batches[i], ins[i], clean[i], batches[j].modality, clean[j]
                )
        return losses

    # -------------------------------------------------------------------------------- training helpers
    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.logit_scale.detach()))

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """CLIP: keep the learned scale in [1, max_logit_scale] (temperature in [1 / max, 1])."""
        self.logit_scale.clamp_(0.0, self.max_log_scale)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on biases, norms, mask tokens and the temperature (the workbench's rule)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or name.endswith("mask_token") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
