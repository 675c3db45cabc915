"""The learned half of tokenization: patches (from :mod:`workbench.model.patching`) -> width-``dim`` tokens.

Two variants, chosen by ``model.tokenizer``:

``specific`` (OmniVec2): one projection per modality (a linear map of its patch values, or an embedding
table for text ids) plus positions that fit the modality: 2-D (row, column) for images, 2-D (time,
mel) for audio, 3-D (time, row, column) for video tubelets, 1-D for text. Positions are fixed sin-cos
(MAE, AudioMAE), so variable-length audio and text need no position table.

``unified`` (the Meta-Transformer / Data2Seq ablation): ONE projection shared by every modality,
applied to a modality-agnostic reshaping of the input, with modality-agnostic 1-D positions (the
token's index in the sequence). The reshaping turns every token into one vector of the same space
R^(S + V):

* numeric signals (image 4x4 pixel patches, audio 8x16 log-mel patches, video 2x8x8 tubelets: the
  same parameter-free patchers as above) fill the first S slots with their P <= S values, zero-padded
  to S = the largest patch size;
* text ids are one-hot vectors in the last V slots (V = ``model.text_vocab_size``). Ids are categories,
  not numbers: projecting the id *value* (7 vs 8) would impose a meaningless order and scale, and
  one-hot is the only modality-agnostic numeric form of a category. A one-hot vector times the
  projection is a row lookup, so text costs an embedding lookup, not a (S+V)-wide matmul.

The shared weight is one (S + V, dim) matrix with one bias, so ``x_token = [values | one-hot] @ W + b``
for every modality; zero padding and one-hot are never materialised (``values @ W[:P]`` and ``W[S + id]``
compute the same product).

``model.stem`` maps a signal to its projection in the ``specific`` tokenizers: ``linear`` (the paper's
patch projection), ``conv`` (a convolutional stem instead) or ``both`` (the stem and the linear
projection, summed). ``model.stem_trunk`` picks the stem: ``strided`` (Xiao et al. 2021, "Early
Convolutions Help Transformers See Better": 3x3 stride-2 convolutions until a cell covers one patch)
or ``pooled`` (:class:`PooledStem`: a small CNN with max-pooling, frame by frame for video, pooled onto
the token grid). Either keeps the token grid, and either reaches a few pixels into neighbouring
patches; masked pre-training therefore zeroes the removed patches' values *before* the stem
(:meth:`SpecificTokenizers.mixes_patches`), so no visible token sees what it must reconstruct. The
linear path beside the stem lets a patch's pixels reach its token linearly, as dense outputs (denoise)
need.

Initialisation keeps token content on the scale of the inputs (LeCun normal for patch projections,
N(0, 1) embedding rows), comparable to the unit-amplitude positions; the transformer default (std 0.02)
would make content ~30x smaller than position and training stalls. No LayerNorm follows the projection:
on blank patches (most of an MNIST digit's background) the projected vector is ~constant and a LayerNorm
there divides by ~0, which blew up the gradients in our runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.errors import ConfigError
from workbench.model.patching import Patcher, Patches, grid_coords, grid_to_signal, sincos_embedding


class ConvStem(nn.Module):
    """A convolutional stem: patches (B, N, prod(patch_shape)) -> tokens (B, N, dim), the token grid kept.

    Subclasses build ``self.net`` (the convolutions) and ``self.proj`` (the last 1x1 projection to
    ``dim``) and say how the signal runs through them. ``linear=True`` (``model.stem: both``) adds the
    linear patch projection beside the stem, the two summed, each initialised at 1/sqrt(2) of unit
    scale, so a patch's values also reach its token linearly, as dense outputs (denoise) need.
    """

    net: nn.Sequential
    proj: nn.Module

    def __init__(self, patch_shape: tuple[int, ...], dim: int, linear: bool):
        super().__init__()
        self.patch_shape = tuple(patch_shape)
        self.linear = nn.Linear(math.prod(self.patch_shape), dim) if linear else None

    def reset_parameters(self) -> None:
        for c in self.net:
            if isinstance(c, nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(c.weight, nonlinearity="relu")  # He init for the GELU levels
                nn.init.zeros_(c.bias)
        paths = 2 if self.linear is not None else 1  # two summed paths: each at 1/sqrt(2) of unit scale
        fan_in = self.proj.weight[0].numel()
        nn.init.normal_(self.proj.weight, std=(paths * fan_in) ** -0.5)  # LeCun: unit-scale content
        nn.init.zeros_(self.proj.bias)
        if self.linear is not None:
            nn.init.normal_(self.linear.weight, std=(paths * self.linear.in_features) ** -0.5)
            nn.init.zeros_(self.linear.bias)

    def embed(self, signal: Tensor, grid: tuple[int, ...]) -> Tensor:
        """The stem proper: (B, 1, *signal) -> (B, N, dim), row-major like the patches."""
        raise NotImplementedError

    def forward(self, values: Tensor, grid: tuple[int, ...]) -> Tensor:
        y = self.embed(grid_to_signal(values, grid, self.patch_shape), grid)
        return y if self.linear is None else y + self.linear(values)


class StridedStem(ConvStem):
    """Xiao et al. 2021 ("Early Convolutions Help Transformers See Better"), ``model.stem_trunk=strided``.

    One level per halving: a 3-wide stride-2 convolution on every axis that still has a factor of 2
    to go (1-wide, stride 1 on the others) and a GELU; widths double up to ``dim / 2``; a 1x1
    convolution projects to ``dim``. A 4x4 image patch takes two levels, an 8x16 audio patch four.
    Works on 2-D (image, audio) and 3-D (video) grids; patch sides must be powers of two.
    """

    def __init__(self, patch_shape: tuple[int, ...], dim: int, name: str = "signal", linear: bool = False):
        super().__init__(patch_shape, dim, linear)
        if any(p < 1 or p & (p - 1) for p in patch_shape):
            raise ConfigError(
                f"model.stem_trunk=strided needs patch sides that are powers of two; the {name} patch is "
                f"{tuple(patch_shape)} (model.stem_trunk=pooled takes any)"
            )
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[len(patch_shape)]
        remaining, levels = list(patch_shape), []
        while any(r > 1 for r in remaining):
            stride = tuple(2 if r > 1 else 1 for r in remaining)
            levels.append(stride)
            remaining = [r // s for r, s in zip(remaining, stride)]
        layers: list[nn.Module] = []
        width = 1
        for i, stride in enumerate(levels):
            out = max(8, dim // 2 ** (len(levels) - i))
            kernel = tuple(3 if s == 2 else 1 for s in stride)
            layers += [conv(width, out, kernel, stride, tuple(k // 2 for k in kernel)), nn.GELU()]
            width = out
        self.net = nn.Sequential(*layers)
        self.proj = conv(width, dim, 1)

    def embed(self, signal: Tensor, grid: tuple[int, ...]) -> Tensor:
        return self.proj(self.net(signal)).flatten(2).transpose(1, 2)  # (B, N, dim)


class PooledStem(ConvStem):
    """A small CNN, then max-pooled onto the token grid (``model.stem_trunk=pooled``, the default for
    ``small``): the hybrid ViT's input (Dosovitskiy et al. 2021, section 3.1) at CPU scale.

    Levels of a 3x3 convolution (stride 1), a GELU and a 2x2 max-pool, ``floor(log2(side))`` of them for
    the patch's smaller side, widths 16, 32, 64, 64...; the feature map is then max-pooled onto the
    token grid (adaptive: a 7x7 image patch, two levels, pools a 7x7 map onto 4x4 tokens) and a 1x1
    projection makes each cell a ``dim``-wide token. A video clip runs through the same 2-D levels frame
    by frame (shared weights), and a tubelet's frames are stacked as channels for the projection, so
    its token still sees how the content moved between them.

    Why: convolution and max-pooling make a token's content nearly the same wherever a stroke falls in
    its cell, which a linear patch projection or the strided stem (a fixed function of each pixel's
    place in the patch) does not, and fewer, richer tokens make the transformer cheaper. Trained alone
    from scratch (200 updates of 64, one thread; RECIPE.md): video/digit 82.2% test with this
    stem on 16 tokens vs 32.2% with linear 8x8 tubelets (64 tokens), in 198 s vs 313 s; image/digit
    82.2% on 16 tokens vs 65.8% with the strided stem on 49, in 101 s vs 258 s.
    """

    WIDTHS = (16, 32, 64)

    def __init__(self, patch_shape: tuple[int, ...], dim: int, name: str = "signal", linear: bool = False):
        super().__init__(patch_shape, dim, linear)
        self.frames = patch_shape[0] if len(patch_shape) == 3 else 1  # video: frames per tubelet
        levels = int(math.log2(min(patch_shape[-2:])))
        layers: list[nn.Module] = []
        width = 1
        for i in range(levels):
            out = self.WIDTHS[min(i, len(self.WIDTHS) - 1)]
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.GELU(), nn.MaxPool2d(2)]
            width = out
        self.net = nn.Sequential(*layers)
        self.proj = nn.Conv2d(width * self.frames, dim, 1)

    def embed(self, signal: Tensor, grid: tuple[int, ...]) -> Tensor:
        cells = tuple(grid[-2:])
        if signal.ndim == 4:  # (B, 1, H, W): a picture or a spectrogram
            y = F.adaptive_max_pool2d(self.net(_channels_last(signal)), cells)
            return self.proj(y).flatten(2).transpose(1, 2)  # (B, N, dim)
        B, _, T, H, W = signal.shape  # (B, 1, T, H, W): a clip, frame by frame
        y = self.net(_channels_last(signal.transpose(1, 2).reshape(B * T, 1, H, W)))
        y = F.adaptive_max_pool2d(y, cells)  # (B*T, C, *cells)
        y = y.reshape(B * grid[0], self.frames * y.shape[1], *cells)  # a tubelet's frames as channels
        y = self.proj(y).flatten(2).transpose(1, 2)  # (B * T/t, cells, dim)
        return y.reshape(B, -1, y.shape[-1])  # (B, N, dim): time-major, like the tubelets


def _channels_last(x: Tensor) -> Tensor:
    """``x`` (N, 1, H, W) restrided channels-last, so every level after it runs channels-last too.

    oneDNN's CPU convolutions, GELU and max-pooling are faster on that layout: the video stem's forward
    and backward over a half-batch of 32 clips take ~25% less time, the image stem's ~20% (``make
    bench``'s machine; the tokens agree to ~1e-5). ``x.contiguous(memory_format=...)`` would not do it:
    with one channel both layouts count as contiguous and the strides stay NCHW; ``.to`` restrides.
    The weights keep the default layout, so checkpoints are unchanged.
    """
    return x.to(memory_format=torch.channels_last)


STEMS = {"strided": StridedStem, "pooled": PooledStem}


def positions(coords: Tensor, dim: int, shift: Tensor | None = None) -> Tensor:
    """Sin-cos positions of ``coords`` (N, k): (N, dim), or (B, N, dim) with each sample's first axis
    moved by ``shift`` (B,) slots. A phrase then reads the same wherever it starts: "seven minus
    two" at positions 0-2 and inside "what is seven minus two?" at 2-4 (``model.text_shift``,
    after the randomized positional encodings of Ruoss et al. 2023, here a random offset)."""
    if shift is None:
        return sincos_embedding(coords, dim)
    moved = coords[None].expand(len(shift), -1, -1).clone()  # (B, N, k)
    moved[..., 0] += shift.to(coords.dtype)[:, None]
    return sincos_embedding(moved.flatten(0, 1), dim).unflatten(0, moved.shape[:2])


class SpecificTokenizers(nn.ModuleDict):
    """``{modality: nn.Linear(P, dim) | ConvStem | nn.Embedding(V, dim)}`` with modality-shaped positions."""

    def __init__(
        self,
        patchers: dict[str, Patcher],
        dim: int,
        vocab_size: int,
        stem: Mapping[str, str] | None = None,
        stem_trunk: str = "strided",
    ):
        def projection(m: str, p: Patcher) -> nn.Module:
            if p.discrete:
                return nn.Embedding(vocab_size, dim)
            kind = (stem or {}).get(m, "linear")
            if kind in ("conv", "both"):
                return STEMS[stem_trunk](p.patch_shape, dim, m, linear=kind == "both")
            return nn.Linear(p.patch_numel, dim)

        super().__init__({m: projection(m, p) for m, p in patchers.items()})
        self.dim = dim

    def mixes_patches(self, modality: str) -> bool:
        """True when a token depends on pixels outside its own patch (a convolutional stem)."""
        return isinstance(self[modality], ConvStem)

    def reset_parameters(self) -> None:
        """Unit-gain init: token content on the scale of the inputs, comparable to the positions."""
        for proj in self.values():
            if isinstance(proj, nn.Embedding):
                nn.init.normal_(proj.weight)  # N(0, 1) rows
            elif isinstance(proj, ConvStem):
                proj.reset_parameters()
            else:
                nn.init.normal_(proj.weight, std=proj.in_features**-0.5)  # LeCun
                nn.init.zeros_(proj.bias)

    def embed(self, modality: str, patches: Patches, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> tokens (B, N, dim) with positions added, and the coordinates used (N, k).

        ``shift`` (B,) moves each sample's 1-D positions by that many slots (see :func:`positions`).
        """
        proj = self[modality]
        if isinstance(proj, ConvStem):
            x = proj(patches.values, patches.grid)
        else:
            x = proj(patches.values)  # (B, N, dim)
        return x + positions(patches.coords, self.dim, shift).to(x.dtype), patches.coords


class UnifiedTokenizer(nn.Module):
    """One shared projection ``W`` (S + V, dim), ``b`` (dim,) for every modality; 1-D positions."""

    def __init__(self, patchers: dict[str, Patcher], dim: int, vocab_size: int):
        super().__init__()
        signals = [p.patch_numel for p in patchers.values() if not p.discrete]
        self.signal_width = max(signals, default=0)  # S
        self.vocab = vocab_size if any(p.discrete for p in patchers.values()) else 0  # V
        self.discrete = {m: p.discrete for m, p in patchers.items()}
        self.weight = nn.Parameter(torch.empty(self.signal_width + self.vocab, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.dim = dim
        self.reset_parameters()

    def mixes_patches(self, modality: str) -> bool:
        return False  # one shared linear map per token

    def reset_parameters(self) -> None:
        """LeCun init over the whole signal width S for the signal rows, N(0, 1) rows for the ids."""
        with torch.no_grad():
            nn.init.normal_(self.weight[: self.signal_width], std=max(self.signal_width, 1) ** -0.5)
            nn.init.normal_(self.weight[self.signal_width :])

    def embed(self, modality: str, patches: Patches, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        v = patches.values
        if self.discrete[modality]:
            x = F.embedding(v, self.weight[self.signal_width :]) + self.bias  # one-hot(id) @ W[S:] + b
        else:
            x = v @ self.weight[: v.shape[-1]] + self.bias  # [v | 0...0] @ W[:S] + b
        coords = grid_coords((v.shape[1],), v.device)  # (N, 1): the token's index, whatever the input
        return x + positions(coords, self.dim, shift).to(x.dtype), coords
