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

``model.stem=conv`` replaces the linear patch projection of the signals in ``model.stem_modalities``
(images by default) in the ``specific`` tokenizers with a
small convolutional stem (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"): 3x3
stride-2 convolutions with GELU until each output cell covers one patch, then a 1x1 projection to
``dim``, so the token grid is unchanged. Its receptive field reaches a few pixels into neighbouring
patches; masked pre-training therefore zeroes the removed patches' values *before* the stem
(:meth:`SpecificTokenizers.mixes_patches`), so no visible token sees what it must reconstruct.
``model.stem=both`` (the default, for images) sums the stem and the linear patch projection (each
initialised at 1/sqrt(2) of unit scale), so a patch's pixels also reach its token linearly, as dense
outputs (denoise) need.

Initialisation keeps token content on the scale of the inputs (LeCun normal for patch projections,
N(0, 1) embedding rows), comparable to the unit-amplitude positions; the transformer default (std 0.02)
would make content ~30x smaller than position and training stalls. No LayerNorm follows the projection:
on blank patches (most of an MNIST digit's background) the projected vector is ~constant and a LayerNorm
there divides by ~0, which blew up the gradients in our runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.errors import ConfigError
from workbench.model.patching import Patcher, Patches, grid_coords, grid_to_signal, sincos_embedding


class ConvStem(nn.Module):
    """Patches (B, N, prod(patch_shape)) -> tokens (B, N, dim) through convolutions over the signal.

    One level per halving: a 3-wide stride-2 convolution on every axis that still has a factor of 2
    to go (1-wide, stride 1 on the others) and a GELU; widths double up to ``dim / 2``; a 1x1
    convolution projects to ``dim``. A 4x4 image patch takes two levels, an 8x16 audio patch four.
    Works on 2-D (image, audio) and 3-D (video) grids; patch sides must be powers of two.
    """

    def __init__(self, patch_shape: tuple[int, ...], dim: int, name: str = "signal", linear: bool = False):
        super().__init__()
        if any(p < 1 or p & (p - 1) for p in patch_shape):
            raise ConfigError(
                f"model.stem=conv needs patch sides that are powers of two; the {name} patch is {patch_shape}"
            )
        self.patch_shape = tuple(patch_shape)
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
        layers.append(conv(width, dim, 1))
        self.net = nn.Sequential(*layers)
        # model.stem=both: the linear patch projection beside the stem, summed; pixels keep a linear path
        self.linear = nn.Linear(math.prod(self.patch_shape), dim) if linear else None

    def reset_parameters(self) -> None:
        convs = [m for m in self.net if isinstance(m, nn.Conv2d | nn.Conv3d)]
        for c in convs[:-1]:
            nn.init.kaiming_normal_(c.weight, nonlinearity="relu")  # He init for the GELU levels
            nn.init.zeros_(c.bias)
        last = convs[-1]
        paths = 2 if self.linear is not None else 1  # two summed paths: each at 1/sqrt(2) of unit scale
        nn.init.normal_(last.weight, std=(paths * last.in_channels) ** -0.5)  # LeCun: unit-scale content
        nn.init.zeros_(last.bias)
        if self.linear is not None:
            nn.init.normal_(self.linear.weight, std=(paths * self.linear.in_features) ** -0.5)
            nn.init.zeros_(self.linear.bias)

    def forward(self, values: Tensor, grid: tuple[int, ...]) -> Tensor:
        y = self.net(grid_to_signal(values, grid, self.patch_shape))  # (B, dim, *grid)
        y = y.flatten(2).transpose(1, 2)  # (B, N, dim), row-major like the patches
        return y if self.linear is None else y + self.linear(values)


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
        stem: str = "linear",
        stem_modalities: Sequence[str] = ("image",),
    ):
        def projection(m: str, p: Patcher) -> nn.Module:
            if p.discrete:
                return nn.Embedding(vocab_size, dim)
            if stem in ("conv", "both") and m in stem_modalities:
                return ConvStem(p.patch_shape, dim, m, linear=stem == "both")
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
