"""The OmniVec2 network (Srivastava & Sharma, CVPR 2024; METHOD.md section 1) as one registry-driven module.

::

    tokenizer_m(x_m) -> x            patches + projection + positions        (B, N, dim)
    f(x)                             pre-norm blocks, LN, FC-ReLU-FC-ReLU-FC  (B, N, w)   w = fc_dims[-1]
    A(q, kv)                         residual multi-head cross-attention       (B, Nq, w)
    g(.)                             pre-norm blocks at width w, LN            (B, N, w)
    h_mt(.)                          one head per (modality, task)             (B, C) or (B, *shape)

Single stream (inference; one medium alone works): ``h(g(f(x)))``, no cross-attention.

A dense image task's output layer may end in a refiner (``model.dense_refine``; ``refiners``, one per
task; :class:`~workbench.model.heads.DenseRefiner`): the per-token pixels the head predicts are
corrected at full resolution by convolutions that also read the task's input.

Two streams i, j (training; ``fusion=hybrid``), our reading of the paper's open choices:

* ``A(f(x_i), f(x_j))`` fuses **both ways with one shared cross-attention** (``A.0``): stream i's
  tokens query stream j's (capture key ``A.i<-j``) and vice versa (``A.j<-i``), each as a residual
  ``u_i = f_i + CA(f_i <- f_j)``. Both directions use the same weights, so swapping the streams swaps
  the outputs (symmetric).
* ``x_hat_ij = g([u_i ; u_j])``: g runs on the concatenated sequence (N_i + N_j tokens, padding masks
  concatenated), so one shared representation holds both streams. No modality embedding is added:
  like the paper, the backbone is not told which modality a token came from.
* ``A(x_hat_ij, x_i)`` fuses back (``A.1``, keys ``A.back.i`` / ``A.back.j``): the queries are stream
  i's part of x_hat_ij, so the result stays on stream i's token grid (dense heads unpatchify it) and
  is a residual on g's output (dropping A at inference leaves exactly ``g(f(x))``, the single-stream
  input of the heads); keys/values are stream i's tokenizer output x_i, width ``dim``. **Widths are
  aligned by A.1's key/value projections** (``dim -> w``); queries and output stay at ``w``.

``fusion=early`` concatenates the two token sequences before f (no A); ``fusion=late`` runs the
streams independently (no A); both are options for the fusion-strategy comparison.

Masked pre-training: stage 1 (``forward_masked``) encodes only the visible tokens with f and a
per-modality decoder (``decoders1``) predicts the rest; stage 2 (``forward_masked_pair``) runs f, A, g
and A-back on the visible tokens of two streams and ``decoders2`` predict. Decoders are discarded
after pre-training (``load_components`` skips them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.batch import Batch
from workbench.config import Config
from workbench.errors import ConfigError
from workbench.modalities import MODALITIES, TaskSpec
from workbench.model import attention as attn
from workbench.model import checkpoint
from workbench.model.attention import CrossAttention, Transformer, init_linear
from workbench.model.heads import HEADS, DenseRefiner, MaskedDecoder, masked_mean
from workbench.model.masking import Masked, bert_corruption, random_masking
from workbench.model.moe import apply_moe
from workbench.model.patching import PATCHERS, Patches
from workbench.model.text_tokenizer import SPECIAL_TOKENS, UNK_ID, TextTokenizer
from workbench.model.tokenizers import SpecificTokenizers, UnifiedTokenizer


@dataclass
class MaskedOutput:
    """One stream's masked-prediction result."""

    loss: Tensor  # scalar: L2 to normalised patches, or cross-entropy over ids (removed tokens; text: see _masked_output)
    pred: Tensor  # (B, N, P) predicted patches, or (B, N, V) logits
    target: Tensor  # (B, N, P) per-patch normalised patches, or (B, N) ids
    mask: Tensor  # (B, N) float, 0 keep, 1 remove (= predicted and scored); padding is 0
    modality: str


@dataclass
class _Visible:
    """What enters f in a masked forward."""

    x: Tensor  # (B, K, dim) visible (or corrupted) tokens with positions
    padding: Tensor | None  # (B, K)
    coords: Tensor  # (N, k) coordinates of the full input (decoder positions)
    masked: Masked | None  # None for corrupted (discrete) inputs: nothing was dropped
    mask: Tensor  # (B, N) 1 = predicted
    patches: Patches
    target: Tensor


class FeatureTransform(nn.Module):
    """f: BERT-style pre-norm blocks, LayerNorm, then three FC layers with ReLU between them reducing
    the width ``dim -> fc_dims[0] -> fc_dims[1] -> fc_dims[2]`` (paper: "to reduce the dimensions").
    The last layer is linear so the features stay signed."""

    def __init__(self, cfg):
        super().__init__()
        d0, d1, d2 = cfg.fc_dims
        self.body = Transformer(
            "f", cfg.dim, cfg.depth_f, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.drop_path
        )
        self.fc = nn.Sequential(
            nn.Linear(cfg.dim, d0), nn.ReLU(), nn.Linear(d0, d1), nn.ReLU(), nn.Linear(d1, d2)
        )

    def reset_fc(self) -> None:
        """He init before each ReLU, Glorot for the last layer: a plain (non-residual) stack must keep the
        scale of its input; the transformer default (std 0.02) would shrink it ~100x over three layers."""
        layers = [m for m in self.fc if isinstance(m, nn.Linear)]
        for layer in layers[:-1]:
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
        nn.init.xavier_uniform_(layers[-1].weight)

    def forward(self, x: Tensor, padding: Tensor | None) -> Tensor:
        return self.fc(self.body(x, padding))  # (B, N, dim) -> (B, N, w)


class Fusion(nn.Module):
    """A: ``fuse`` (A.0, shared by both directions, w <- w) and ``back`` (A.1, w <- dim)."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.fc_dims[-1]
        self.fuse = CrossAttention("A.0", w, cfg.heads, dropout=cfg.dropout)
        self.back = CrossAttention("A.1", w, cfg.heads, kv_dim=cfg.dim, dropout=cfg.dropout)

    def zero_outputs(self) -> None:
        """Zero both output projections (``model.zero_fusion``): each residual cross-attention then starts
        as the identity, as Flamingo's tanh gates at 0 and ControlNet's zero convolutions do, so a
        freshly built A passes every stream through unchanged and only learns to mix them."""
        for ca in (self.fuse, self.back):
            nn.init.zeros_(ca.attn.proj.weight)
            nn.init.zeros_(ca.attn.proj.bias)


def _cat_padding(pa: Tensor | None, pb: Tensor | None, na: int, nb: int, B: int, device) -> Tensor | None:
    if pa is None and pb is None:
        return None
    pa = torch.zeros(B, na, dtype=torch.bool, device=device) if pa is None else pa
    pb = torch.zeros(B, nb, dtype=torch.bool, device=device) if pb is None else pb
    return torch.cat([pa, pb], dim=1)


def _init_weights(m: nn.Module, scheme: str = "trunc_normal") -> None:
    if isinstance(m, nn.Linear):
        init_linear(m, scheme)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def check_tasks(tasks: Sequence[TaskSpec]) -> None:
    """Refuse task lists the network cannot be built for (ConfigError, one sentence)."""
    if not tasks:
        raise ConfigError("the model needs at least one task (modality/task) to build heads for")
    seen = set()
    for t in tasks:
        if t.modality not in PATCHERS:
            raise ConfigError(
                f"task {t.key}: the network has no tokenizer for modality {t.modality!r} "
                f"(known: {', '.join(PATCHERS)})"
            )
        if t.key in seen:
            raise ConfigError(f"task {t.key} is listed twice")
        seen.add(t.key)
        if t.kind == "classification" and not t.labels:
            raise ConfigError(f"classification task {t.key} has no labels")
        if t.kind == "dense" and not t.shape:
            raise ConfigError(f"dense task {t.key} has no target shape")
        if t.kind not in ("classification", "dense"):
            raise ConfigError(f"task {t.key} has kind {t.kind!r}; expected classification or dense")


class OmniVec2(nn.Module):
    """The network. Build with :func:`build_model`; see the module docstring for the data flow."""

    def __init__(self, config: Config, tasks: Sequence[TaskSpec]):
        super().__init__()
        check_tasks(tasks)
        cfg = config.model
        self.config = config
        self.tasks: dict[str, TaskSpec] = {t.key: t for t in tasks}
        present = {t.modality for t in tasks}
        self.modalities = [m for m in MODALITIES if m in present] + sorted(present - set(MODALITIES))
        w = cfg.fc_dims[-1]

        self.patchers = nn.ModuleDict({m: PATCHERS[m](cfg) for m in self.modalities})  # no parameters
        if cfg.tokenizer == "unified":
            self.tokenizers = UnifiedTokenizer(dict(self.patchers), cfg.dim, cfg.text_vocab_size)
        else:
            self.tokenizers = SpecificTokenizers(
                dict(self.patchers), cfg.dim, cfg.text_vocab_size, cfg.stem, cfg.stem_trunk
            )
        self.text_shift = cfg.text_shift
        self.text_unk = cfg.text_unk
        self.f = FeatureTransform(cfg)
        self.A = Fusion(cfg) if cfg.fusion == "hybrid" else None
        self.g = Transformer("g", w, cfg.depth_g, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.drop_path)
        # per-token values of each dense task on its modality's grid (None: predicted from the pooled token)
        self.token_numel = {
            t.key: self.patchers[t.modality].dense_numel(t.shape) if t.kind == "dense" else None
            for t in tasks
        }
        self.heads = HEADS[cfg.task_head](w, cfg, list(tasks), self.token_numel)
        out = {m: cfg.text_vocab_size if p.discrete else p.patch_numel for m, p in self.patchers.items()}
        for stage in (1, 2):
            decoders = {
                m: MaskedDecoder(f"decoder{stage}.{m}", w, cfg, out[m], self.patchers[m].discrete)
                for m in self.modalities
            }
            setattr(self, f"decoders{stage}", nn.ModuleDict(decoders))
        self.apply(lambda m: _init_weights(m, cfg.init))
        self.f.reset_fc()
        if self.A is not None and cfg.zero_fusion:
            self.A.zero_outputs()
        self.tokenizers.reset_parameters()  # unit-gain token content (see tokenizers.py)
        apply_moe(self)  # IMP: the blocks model.moe_* names become mixture-of-experts (no-op when dense)
        # model.dense_refine: the dense output on the input's own pixel grid is refined at full
        # resolution with the input beside it (heads.DenseRefiner); image tasks only, where y is a picture.
        # Built last on a forked RNG: with or without refiners, every other weight is drawn the same.
        with torch.random.fork_rng(devices=[]):
            self.refiners = nn.ModuleDict(
                {
                    t.key: DenseRefiner(t.shape[0], cfg.dense_refine, cfg.dense_refine_depth)
                    for t in tasks
                    if cfg.dense_refine and t.kind == "dense" and t.modality == "image" and len(t.shape) == 3
                }
            )
            for refiner in self.refiners.values():
                refiner.reset_parameters()  # starts as the identity
        self.text_tokenizer = None

    # ---------------------------------------------------------------------------------- properties
    @property
    def text_tokenizer(self) -> TextTokenizer | None:
        """The text tokenizer (words or BPE, ``model.text_vocab``) whose ids the text embedding is indexed by (saved with the checkpoint)."""
        return self._text_tokenizer

    @text_tokenizer.setter
    def text_tokenizer(self, tok: TextTokenizer | None) -> None:
        limit = self.config.model.text_vocab_size
        if tok is not None and tok.vocab_size > limit:
            raise ConfigError(
                f"the text tokenizer has {tok.vocab_size} ids but model.text_vocab_size={limit}"
            )
        self._text_tokenizer = tok
        for p in self.patchers.values():
            if p.discrete:  # random BERT replacements come from the trained vocabulary only
                p.random_ids = (p.random_ids[0], max(p.random_ids[0] + 1, tok.vocab_size if tok else limit))

    def task_keys(self, modality: str, tasks: Sequence[str] | None = None) -> list[str]:
        """Task keys of ``modality`` (all of them by default); ``tasks`` may hold names or full keys."""
        if modality not in self.patchers:
            raise ConfigError(f"the model has no tokenizer for {modality!r}; it has {self.modalities}")
        if tasks is None:
            keys = [k for k, t in self.tasks.items() if t.modality == modality]
        else:
            keys = [t if "/" in t else f"{modality}/{t}" for t in tasks]
        for k in keys:
            self._task(k)
        if not keys:
            raise ConfigError(f"the model has no task for modality {modality!r}; it has {list(self.tasks)}")
        return keys

    def _task(self, key: str) -> TaskSpec:
        if key not in self.tasks:
            raise ConfigError(f"the model has no head for task {key!r}; it has {list(self.tasks)}")
        return self.tasks[key]

    @contextmanager
    def _stream(self, tag: str) -> Iterator[None]:
        """Label attention captured by per-stream modules (``f.0[i]``) inside a two-stream forward."""
        rec = attn.active_recorder(self)
        old = rec.scope if rec else None
        if rec:
            rec.scope = tag
        try:
            yield
        finally:
            if rec:
                rec.scope = old

    # ------------------------------------------------------------------------------- named stages
    def tokenize(
        self, batch: Batch, generator: torch.Generator | None = None
    ) -> tuple[Patches, Tensor, Tensor]:
        """-> patches, tokens (B, N, dim) with positions, token coordinates (N, k). ``generator`` draws
        the training-time noise (the patchers' augmentation, ``model.text_unk`` word dropout,
        ``model.text_shift`` position offsets); None: the global generator."""
        if batch.modality not in self.patchers:
            raise ConfigError(f"the model has no tokenizer for {batch.modality!r}; it has {self.modalities}")
        patcher = self.patchers[batch.modality]
        task = self.tasks.get(batch.key)
        # dense targets would have to move with their inputs: classification batches only
        augment = self.training and task is not None and task.kind == "classification"
        x, lengths = (
            patcher.augment_input(batch.x, batch.lengths, generator) if augment else (batch.x, batch.lengths)
        )
        p = patcher(x, lengths)
        if augment:
            p = patcher.augment(p, generator)
        seen = self._word_dropout(batch.modality, p, generator)
        x, coords = self.tokenizers.embed(batch.modality, seen, self._shift(batch.modality, p, generator))
        return p, x, coords

    def _word_dropout(self, modality: str, p: Patches, generator: torch.Generator | None) -> Patches:
        """In training, each word (not the special ids) becomes ``[UNK]`` with probability
        ``model.text_unk``, so that an unseen word at test time, which the tokenizer maps to ``[UNK]``,
        is something the network has learned to read past (word dropout, Iyyer et al. 2015). The draw
        comes from ``generator`` like :meth:`_shift`'s; signals, eval and ``text_unk=0`` are untouched."""
        if not (self.training and self.text_unk and self.patchers[modality].discrete):
            return p
        hide = torch.rand(p.values.shape, generator=generator).to(p.values.device) < self.text_unk
        hide &= p.values >= len(SPECIAL_TOKENS)
        return replace(p, values=p.values.masked_fill(hide, UNK_ID))

    def _shift(self, modality: str, p: Patches, generator: torch.Generator | None) -> Tensor | None:
        """In training, a random start in [0, model.text_shift] per phrase, drawn on the CPU from
        ``generator`` (the training loop passes one seeded by (seed, stage, step), so a resumed run
        replays the draws); in eval, the middle of that range, ``text_shift // 2``, for every phrase
        (the edge of the range, 0, read the default run's test phrases 5 points worse: RECIPE.md);
        None for signals and when off (no draw at all)."""
        if not (self.text_shift and self.patchers[modality].discrete):
            return None
        B = p.values.shape[0]
        if not self.training:
            return torch.full((B,), self.text_shift // 2, device=p.values.device)
        return torch.randint(0, self.text_shift + 1, (B,), generator=generator).to(p.values.device)

    def encode(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """Single-stream features g(f(x)): (B, N, w) and the padding mask (B, N)."""
        p, x, _ = self.tokenize(batch)
        return self.g(self.f(x, p.padding), p.padding), p.padding

    def features(self, batch: Batch) -> Tensor:
        """One embedding per sample, the mean of g(f(x)) over valid tokens: (B, w). For adaptation
        (paper: frozen network + two FC layers) and cross-modal retrieval."""
        z, padding = self.encode(batch)
        return masked_mean(z, padding)

    def _two_streams(self, xa: Tensor, pad_a, xb: Tensor, pad_b) -> tuple[Tensor, Tensor]:
        """Head inputs of two streams: hybrid ``A(g(A(f(x_i), f(x_j))), x_i)``, or early/late fusion."""
        B, Na, Nb = xa.shape[0], xa.shape[1], xb.shape[1]
        mode = self.config.model.fusion
        if mode != "late" and xb.shape[0] != B:
            raise ValueError(
                f"two-stream fusion pairs samples row by row: batch sizes {B} and {xb.shape[0]} differ"
            )
        pad = _cat_padding(pad_a, pad_b, Na, Nb, B, xa.device)
        if mode == "early":  # one joint sequence through f and g
            xh = self.g(self.f(torch.cat([xa, xb], 1), pad), pad)  # (B, Na+Nb, w)
            return xh[:, :Na], xh[:, Na:]
        if mode == "late":  # no interaction: two single streams
            with self._stream("i"):
                za = self.g(self.f(xa, pad_a), pad_a)
            with self._stream("j"):
                zb = self.g(self.f(xb, pad_b), pad_b)
            return za, zb
        with self._stream("i"):
            fa = self.f(xa, pad_a)  # (B, Na, w)
        with self._stream("j"):
            fb = self.f(xb, pad_b)  # (B, Nb, w)
        ua = self.A.fuse(fa, fb, pad_b, tag="A.i<-j")  # queries i, keys/values j
        ub = self.A.fuse(fb, fa, pad_a, tag="A.j<-i")
        xh = self.g(torch.cat([ua, ub], 1), pad)  # x_hat_ij (B, Na+Nb, w)
        oa = self.A.back(xh[:, :Na], xa, pad_a, tag="A.back.i")  # A(x_hat_ij, x_i): (B, Na, w)
        ob = self.A.back(xh[:, Na:], xb, pad_b, tag="A.back.j")
        return oa, ob

    def _predict(
        self, key: str, z: Tensor, padding: Tensor | None, coords: Tensor, x: Tensor | None = None
    ) -> Tensor:
        """h_mt on features z (B, N, w) -> logits (B, C) or the dense prediction (B, *shape). ``x``: the
        batch's input, which a task with a refiner (``model.dense_refine``) reads at full resolution."""
        task = self._task(key)
        out = self.heads(key, z, padding, coords)
        if task.kind == "dense":
            if self.token_numel[key]:
                out = self.patchers[task.modality].unpatchify(out, task.shape)
            else:
                out = out.view(out.shape[0], *task.shape)
            if key in self.refiners:
                if x is None:
                    raise ValueError(f"{key} has a refiner: _predict needs the batch's input")
                out = self.refiners[key](out, x)
        return out

    # ------------------------------------------------------------------------------ forward paths
    def forward(self, a: Batch, b: Batch | None = None):
        """``forward(batch)`` = :meth:`forward_single`; ``forward(a, b)`` = :meth:`forward_pair`."""
        return self.forward_single(a) if b is None else self.forward_pair(a, b)

    def forward_single(
        self, batch: Batch, tasks: Sequence[str] | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """h(g(f(x))) for each task of the batch's modality: ``{task name: (B, C) logits | (B, *shape)}``.
        ``generator``: training-time text noise, as in :meth:`tokenize`."""
        keys = self.task_keys(batch.modality, tasks)
        p, x, coords = self.tokenize(batch, generator)
        z = self.g(self.f(x, p.padding), p.padding)  # (B, N, w)
        return {self.tasks[k].name: self._predict(k, z, p.padding, coords, batch.x) for k in keys}

    def forward_pair(
        self, a: Batch, b: Batch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Two streams, pred_i = h_iq(A(x_hat_ij, x_i)) (METHOD.md): predictions for a.task and b.task."""
        self._task(a.key), self._task(b.key)
        pa, xa, ca = self.tokenize(a, generator)
        pb, xb, cb = self.tokenize(b, generator)
        oa, ob = self._two_streams(xa, pa.padding, xb, pb.padding)
        with self._stream("i"):
            pred_a = self._predict(a.key, oa, pa.padding, ca, a.x)
        with self._stream("j"):
            pred_b = self._predict(b.key, ob, pb.padding, cb, b.x)
        return pred_a, pred_b

    def _visible(self, batch: Batch, ratio: float, generator: torch.Generator | None) -> _Visible:
        """Tokenize and mask: signals drop tokens (MAE), discrete ids are corrupted 8:1:1 (BERT)."""
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"mask ratio {ratio} must be in [0, 1)")
        if batch.modality not in self.patchers:
            raise ConfigError(f"the model has no tokenizer for {batch.modality!r}; it has {self.modalities}")
        patcher = self.patchers[batch.modality]
        p = patcher(batch.x, batch.lengths)
        target = patcher.target(p.values)
        if patcher.discrete:
            ids, mask = bert_corruption(
                p.values, ratio, patcher.mask_id, patcher.random_ids, p.padding, generator
            )
            x, coords = self.tokenizers.embed(
                batch.modality, replace(p, values=ids), self._shift(batch.modality, p, generator)
            )
            return _Visible(x, p.padding, coords, None, mask, p, target)
        m = random_masking(p.values, ratio, p.padding, generator)  # the draw depends on (B, N) only
        seen = p
        if self.tokenizers.mixes_patches(batch.modality):  # a conv stem: hide removed patches from it
            seen = replace(p, values=p.values * (1.0 - m.mask).unsqueeze(-1).to(p.values.dtype))
        x, coords = self.tokenizers.embed(batch.modality, seen)
        kept = torch.gather(x, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, dim)
        kept_padding = m.kept_padding if m.kept_padding.any() else None
        return _Visible(kept, kept_padding, coords, m, m.mask, p, target)

    def _masked_output(
        self, modality: str, pred: Tensor, v: _Visible, visible_weight: float = 0.0
    ) -> MaskedOutput:
        """The reconstruction loss: mean over the predicted (masked) tokens. For discrete inputs
        ``visible_weight`` > 0 also scores the uncorrupted valid tokens, each at that weight relative
        to a masked one (``train.mlm_visible_weight``)."""
        weight = v.mask
        if self.patchers[modality].discrete:
            per_token = F.cross_entropy(pred.float().flatten(0, 1), v.target.flatten(), reduction="none")
            per_token = per_token.view_as(v.mask)  # (B, N)
            if visible_weight:
                valid = 1.0 if v.patches.padding is None else (~v.patches.padding).to(v.mask.dtype)
                weight = v.mask + visible_weight * valid * (1 - v.mask)
        else:
            per_token = (pred.float() - v.target).pow(2).mean(-1)  # (B, N) L2 per patch
        loss = (per_token * weight).sum() / weight.sum().clamp(min=1)
        return MaskedOutput(loss, pred, v.target, v.mask, modality)

    def forward_masked(
        self,
        batch: Batch,
        mask_ratio: float,
        generator: torch.Generator | None = None,
        visible_weight: float = 0.0,
    ) -> MaskedOutput:
        """Stage 1: encode the visible tokens with f; ``decoders1[modality]`` predicts the removed ones
        (and, for text with ``visible_weight`` > 0, the kept ones too: see :meth:`_masked_output`)."""
        v = self._visible(batch, mask_ratio, generator)
        z = self.f(v.x, v.padding)  # (B, K, w)
        pred = self.decoders1[batch.modality](z, v.coords, v.patches.padding, v.masked)  # (B, N, P | V)
        return self._masked_output(batch.modality, pred, v, visible_weight)

    def forward_masked_pair(
        self,
        a: Batch,
        b: Batch,
        ratio_a: float,
        ratio_b: float,
        generator: torch.Generator | None = None,
        visible_weight: float = 0.0,
    ) -> tuple[MaskedOutput, MaskedOutput]:
        """Stage 2: mask both streams, run f, A, g, A-back on the visible tokens; ``decoders2`` predict."""
        va = self._visible(a, ratio_a, generator)
        vb = self._visible(b, ratio_b, generator)
        oa, ob = self._two_streams(va.x, va.padding, vb.x, vb.padding)
        with self._stream("i"):
            pred_a = self.decoders2[a.modality](oa, va.coords, va.patches.padding, va.masked)
        with self._stream("j"):
            pred_b = self.decoders2[b.modality](ob, vb.coords, vb.patches.padding, vb.masked)
        return (
            self._masked_output(a.modality, pred_a, va, visible_weight),
            self._masked_output(b.modality, pred_b, vb, visible_weight),
        )

    def task_loss(self, task_key: str, pred: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Cross-entropy for classification (``label_smoothing`` of the target mass spread over the
        classes, Szegedy et al. 2016), mean squared error (per-pixel L2) for dense tasks."""
        if self._task(task_key).kind == "classification":
            return F.cross_entropy(pred.float(), y, label_smoothing=label_smoothing)
        return F.mse_loss(pred.float(), y.float())

    # -------------------------------------------------------------------------------------- probing
    def capture_attention(self, outputs: bool = False):
        """Context manager yielding ``{name: (B, heads, Q, K)}`` for every attention map computed inside:
        ``f.<l>``, ``g.<l>``, ``head.<modality/task>.<l>`` (``head.<l>`` for the unified head),
        ``decoder<1|2>.<modality>.<l>``, and in two-stream forwards ``A.i<-j``, ``A.j<-i``, ``A.back.i``,
        ``A.back.j`` (i = the first batch); per-stream modules then carry ``[i]``/``[j]`` (``f.0[i]``).
        ``outputs=True`` also fills ``.outputs`` with per-head outputs (B, heads, Q, head_dim)."""
        return attn.capture_attention(self, outputs)

    def silence_heads(self, targets: Sequence[tuple[str, int, int]]):
        """Context manager zeroing heads ``(module, layer, head)``: module is ``f``, ``g``, ``A`` (layer 0
        fusion, 1 fuse-back), ``head.<modality/task>`` (``head`` when unified) or ``decoder1.<modality>``."""
        return attn.silence_heads(self, targets)

    def attention_layout(self) -> dict[str, tuple[int, int]]:
        """``{module: (layers, heads)}`` of every attention module (for pickers in the app)."""
        layout: dict[str, tuple[int, int]] = {}
        for name, m in attn.attention_modules(self).items():
            owner = name.rsplit(".", 1)[0]
            layers, _ = layout.get(owner, (0, m.heads))
            layout[owner] = (layers + 1, m.heads)
        return layout

    # --------------------------------------------------------------------------------- bookkeeping
    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per component (tokenizers, f, A, g, heads, refiners, decoders1, decoders2)
        and total; a component without parameters (the patchers, no refiner) is left out."""
        counts = {name: sum(p.numel() for p in child.parameters()) for name, child in self.named_children()}
        counts = {name: n for name, n in counts.items() if n}
        counts["total"] = sum(counts.values())
        return counts

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameters per modality tokenizer, per head and per decoder (``heads.image/digit``...)."""
        out: dict[str, int] = {}
        for name, child in self.named_children():
            if isinstance(child, nn.ModuleDict) and name != "patchers":
                for key, sub in child.items():
                    out[f"{name}.{key}"] = sum(p.numel() for p in sub.parameters())
        return out

    def token_counts(self) -> dict[str, int]:
        """The most tokens one sample of each modality can become (the longest allowed input)."""
        return {m: p.max_tokens for m, p in self.patchers.items()}

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: tokenizers 0, f's blocks 1..depth_f, f's FC
        layers and A one above them, g's blocks next, and g's norm, the heads and decoders on top."""
        cfg = self.config.model
        top = cfg.depth_f + cfg.depth_g + 2
        parts = name.split(".")
        if parts[0] == "tokenizers":
            return 0
        if parts[:3] == ["f", "body", "blocks"]:
            return int(parts[3]) + 1
        if parts[0] in ("f", "A"):
            return cfg.depth_f + 1
        if parts[:2] == ["g", "blocks"]:
            return cfg.depth_f + 2 + int(parts[2])
        return top

    def optimizer_groups(self, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
        """AdamW parameter groups (timm/MAE habit): no weight decay on biases, norms, tokens, embeddings
        of labels and the temperature (every parameter with fewer than 2 dimensions or a learned token).

        With ``layer_decay < 1`` (BEiT / MAE fine-tuning) each group also carries ``lr_scale =
        layer_decay ** (top - layer_id)``: the heads train at the full rate, each layer below at
        ``layer_decay`` times the one above. Groups come top layer first."""
        top = self.layer_id("heads")
        groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim < 2 or name.endswith(("cls", "mask_token", "label_embed"))
            depth = top - self.layer_id(name) if layer_decay != 1.0 else 0  # off: the two groups of before
            groups.setdefault((depth, skip), []).append(p)
        return [
            {"params": params, "weight_decay": 0.0 if skip else weight_decay, "lr_scale": layer_decay**depth}
            for (depth, skip), params in sorted(groups.items())
        ]

    def init_heads_from_decoders(self) -> list[str]:
        """``task_head=autoencoder``: copy each modality's stage-1 decoder trunk into its tasks' heads."""
        if self.config.model.task_head != "autoencoder":
            raise ConfigError("init_heads_from_decoders needs model.task_head=autoencoder")
        for key, head in self.heads.items():
            dec = self.decoders1[self.tasks[key].modality]
            head.embed.load_state_dict(dec.embed.state_dict())
            head.body.load_state_dict(dec.body.state_dict())
        return list(self.heads)

    # ---------------------------------------------------------------------------------- checkpoints
    def save_pretrained(
        self, directory: str | Path, config: Config | None = None, text_tokenizer: TextTokenizer | None = None
    ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``); see checkpoint.py."""
        return checkpoint.save_pretrained(self, directory, config, text_tokenizer)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, expect_tasks: Sequence[TaskSpec] | None = None
    ) -> OmniVec2:
        """Load a checkpoint directory; CheckpointError if it does not match the code or ``expect_tasks``."""
        return checkpoint.from_pretrained(directory, cls, expect_tasks)

    def load_components(self, directory: str | Path, prefixes: Sequence[str] = ("tokenizers", "f", "A", "g")):
        """Initialise components from an earlier stage's checkpoint (skipping decoders/heads by default)."""
        return checkpoint.load_components(self, directory, prefixes)


def build_model(cfg: Config, tasks: Sequence[TaskSpec]) -> OmniVec2:
    """The network for ``cfg.model`` with one head per task (e.g. ``default_tasks(cfg.data.modalities)``)."""
    return OmniVec2(cfg, list(tasks))
