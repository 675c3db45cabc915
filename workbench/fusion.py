"""Fusion strategies on label-aligned pairs, with a missing or noisy modality (METHOD.md section 4, the article).

Two modalities A and B (default image + audio) show the same digit in every pair
(``data.pairing=aligned``: :func:`~workbench.data.make_paired_loader`); one :class:`PairClassifier`
predicts that digit from both streams. The three strategies differ only in *where the streams meet*;
tokenizers, f, g and the heads are the OmniVec2 network's own (:func:`~workbench.model.build_model`)::

    early    [x_A + e_A ; x_B + e_B] -> f -> g          one joint sequence; e = learned modality embedding
    late     g(f(x_A)),  g(f(x_B))                      two independent single streams
    hybrid   A(g(A(f(x_A), f(x_B))), x_A), and for B    OmniVec2's two-stream path (f, A, g, A-back)

Read-out (``readout``), the same for every strategy so it is not what is compared:

* ``logits`` (default): each stream's own task head ``h_m/digit`` reads that stream's features (its
  part of the joint sequence for early, its A-back output for hybrid) and the logits of the present
  streams are **averaged**. For late fusion this is classic logit averaging.
* ``concat``: the masked mean of each stream's features, concatenated (A then B), one linear layer.
  A dropped stream's slot is zeros.

**Missing modality** (our choice, the same for every strategy): a dropped stream is *absent*, not
replaced by zeros or a mask token. ``forward(a, None)`` runs what remains: early fusion puts only A's
tokens (with A's modality embedding) in the sequence; hybrid takes OmniVec2's single-stream path
``g(f(x_A))`` (no cross-attention, METHOD.md section 1: "a trained model must work on one medium
alone"); late fusion keeps A's logits, which are then *exactly* A's own logits. Absence is what a
deployed system sees when a sensor is off, and it needs no token the model never saw in training.
Training always shows both streams unless ``modality_dropout > 0`` (then, per step, with that
probability one stream, A or B at random, is left out of the whole batch).

**Noise**: additive Gaussian noise on the raw input of one stream at a per-sample signal-to-noise
ratio, ``std = rms(x) / 10^(snr_db / 20)`` over the valid entries (audio padding stays silent), so one
dB scale serves images and waveforms. Discrete inputs (text ids) have no Gaussian corruption: their
noise conditions are left out of :func:`conditions`.

:func:`train_fusion` trains one strategy (plain AdamW, the warm-up/cosine schedule of ``train.*``,
seeded, fp32 on CPU); :func:`evaluate_fusion` scores it on aligned *test* pairs under every condition
and returns a tidy table (one dict per condition). Every strategy and seed is scored on the same test
pairs and the same noise draws (both seeded by ``eval_seed``), so differences come from training only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.batch import Batch
from workbench.config import Config, from_dict, to_dict
from workbench.errors import ConfigError
from workbench.hardware import torch_threads
from workbench.modalities import TaskSpec
from workbench.model import build_model
from workbench.model.heads import masked_mean
from workbench.stats import mean_spread

STRATEGIES = ("early", "late", "hybrid")
READOUTS = ("logits", "concat")
DEFAULT_PAIR = ("image", "audio")
DEFAULT_SNR_DB = (20.0, 10.0, 0.0, -10.0)


# ------------------------------------------------------------------------------------------ the model
class PairClassifier(nn.Module):
    """Predicts the digit two aligned streams share, with one of :data:`STRATEGIES` fusing them.

    Wraps an OmniVec2 built for the two streams' tasks, with ``model.fusion`` set to the strategy (so
    ``A`` exists only for hybrid). Parts this study never runs are removed so that every parameter
    trains: the masked-prediction decoders, and the task heads under ``readout="concat"``.
    """

    def __init__(self, cfg: Config, strategy: str, tasks: Sequence[TaskSpec], readout: str = "logits"):
        super().__init__()
        _check_choice("strategy", strategy, STRATEGIES)
        _check_choice("readout", readout, READOUTS)
        if len(tasks) != 2 or tasks[0].modality == tasks[1].modality:
            raise ConfigError(
                f"a fusion pair needs tasks of two different modalities, got {[t.key for t in tasks]}"
            )
        if tasks[0].labels != tasks[1].labels or tasks[0].kind != "classification":
            raise ConfigError(
                f"{tasks[0].key} and {tasks[1].key} must be classification tasks with the same labels"
            )
        self.strategy, self.readout = strategy, readout
        self.tasks = tuple(tasks)
        self.keys = (tasks[0].key, tasks[1].key)
        self.num_classes = tasks[0].num_classes
        data = to_dict(cfg)
        data["model"]["fusion"] = strategy
        self.net = build_model(from_dict(data), list(tasks))
        self.net.decoders1, self.net.decoders2 = nn.ModuleDict(), nn.ModuleDict()  # pre-training only
        w = cfg.model.fc_dims[-1]
        self.modality_embed = None
        if strategy == "early":
            # One learned vector per stream added to its tokens (BERT's token-type embedding). N(0, 1) rows:
            # tokens are unit-scale (tokenizers.py), so a std-0.02 row would be invisible beside them.
            self.modality_embed = nn.Embedding(2, cfg.model.dim)
            nn.init.normal_(self.modality_embed.weight)
        self.classifier = None
        if readout == "concat":
            self.net.heads = nn.ModuleDict()
            self.classifier = nn.Linear(2 * w, self.num_classes)

    # -------------------------------------------------------------------------------- named stages
    def _tokens(self, batch: Batch, stream: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """Tokenizer output (B, N, dim) [+ modality embedding], padding (B, N), coordinates (N, k)."""
        p, x, coords = self.net.tokenize(batch)
        if self.modality_embed is not None:
            x = x + self.modality_embed.weight[stream].to(x.dtype)  # broadcast over (B, N)
        return x, p.padding, coords

    def _single(self, x: Tensor, padding: Tensor | None) -> Tensor:
        """A stream on its own: g(f(x)) (B, N, w), OmniVec2's single-stream path."""
        return self.net.g(self.net.f(x, padding), padding)

    def stream_features(
        self, a: Batch | None, b: Batch | None
    ) -> list[tuple[int, Tensor, Tensor | None, Tensor]]:
        """``[(stream, features (B, N, w), padding, coords)]`` of the present streams (0 = A, 1 = B)."""
        present = [(s, batch) for s, batch in enumerate((a, b)) if batch is not None]
        if not present:
            raise ValueError("PairClassifier needs at least one of the two streams")
        for s, batch in present:
            if batch.modality != self.tasks[s].modality:
                raise ValueError(f"stream {'AB'[s]} expects {self.tasks[s].modality}, got {batch.modality}")
        toks = [(s, *self._tokens(batch, s)) for s, batch in present]
        if len(toks) == 1:  # a missing modality: the remaining stream alone, for every strategy
            s, x, pad, coords = toks[0]
            return [(s, self._single(x, pad), pad, coords)]
        (_, xa, pa, ca), (_, xb, pb, cb) = toks
        # The network's own two-stream forward for model.fusion = the strategy (the path stage 3 trains):
        # early, one joint sequence through f and g; late, two single streams; hybrid, f, A, g, A-back.
        za, zb = self.net._two_streams(xa, pa, xb, pb)  # (B, Na, w), (B, Nb, w)
        return [(0, za, pa, ca), (1, zb, pb, cb)]

    def forward(self, a: Batch | None, b: Batch | None) -> Tensor:
        """Logits (B, C) of the shared label from stream A and/or B (``None`` = that modality is missing)."""
        feats = self.stream_features(a, b)
        if self.classifier is None:  # each stream's own head, logits averaged over the present streams
            logits = [self.net._predict(self.keys[s], z, pad, coords) for s, z, pad, coords in feats]
            return torch.stack(logits).mean(0)
        B, w = feats[0][1].shape[0], feats[0][1].shape[-1]
        pooled = [feats[0][1].new_zeros(B, w) for _ in range(2)]  # a missing stream's slot stays zero
        for s, z, pad, _ in feats:
            pooled[s] = masked_mean(z, pad)
        return self.classifier(torch.cat(pooled, dim=-1))  # (B, 2w) -> (B, C)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on biases, norms, learned tokens and embeddings (the network's rule)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            skip = (
                p.ndim < 2 or name.endswith(("cls", "mask_token", "label_embed")) or "modality_embed" in name
            )
            (no_decay if skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")


# ------------------------------------------------------------------------------------------ corruption
def add_noise(batch: Batch, snr_db: float, generator: torch.Generator | None = None) -> Batch:
    """``batch`` with Gaussian noise on its input at ``snr_db`` per sample (valid entries only).

    ``std_i = rms(x_i) / 10^(snr_db / 20)``; for variable-length inputs (``lengths``) the rms and the
    noise cover the first ``lengths[i]`` entries of each row, so padding stays zero.
    """
    if not batch.x.is_floating_point():
        raise ConfigError(f"{batch.modality} inputs are discrete ids: Gaussian noise does not apply")
    x = batch.x
    B = x.shape[0]
    valid = torch.ones_like(x, dtype=torch.bool)
    if batch.lengths is not None:  # (B, L) signals padded on the right
        valid = torch.arange(x.shape[1], device=x.device)[None] < batch.lengths[:, None].to(x.device)
        valid = valid.view(B, x.shape[1], *([1] * (x.ndim - 2))).expand_as(x)
    mask = valid.to(x.dtype)
    power = (x.pow(2) * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)  # (B,)
    std = power.sqrt() / 10 ** (snr_db / 20)  # (B,)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    noisy = x + noise * std.view(B, *([1] * (x.ndim - 1))) * mask
    return replace(batch, x=noisy)


@dataclass(frozen=True)
class Condition:
    """A test-time condition: both streams clean, one dropped, or one with Gaussian noise."""

    name: str
    stream: int | None = None  # 0 = A, 1 = B, None = both clean
    corruption: str = "none"  # none | drop | noise
    snr_db: float | None = None

    def apply(self, a: Batch, b: Batch, generator: torch.Generator) -> tuple[Batch | None, Batch | None]:
        pair: list[Batch | None] = [a, b]
        if self.corruption == "drop":
            pair[self.stream] = None
        elif self.corruption == "noise":
            pair[self.stream] = add_noise(pair[self.stream], self.snr_db, generator)
        return pair[0], pair[1]


def conditions(
    pair: Sequence[str], snr_db: Sequence[float] = DEFAULT_SNR_DB, discrete: Sequence[bool] = (False, False)
) -> list[Condition]:
    """Both clean; each modality dropped; each continuous modality noisy at every ``snr_db``."""
    out = [Condition("both")]
    out += [Condition(f"no {m}", s, "drop") for s, m in enumerate(pair)]
    for s, m in enumerate(pair):
        if not discrete[s]:
            out += [Condition(f"{m} noise {v:g} dB", s, "noise", float(v)) for v in snr_db]
    return out


# ------------------------------------------------------------------------------------------ data
@dataclass
class FusionData:
    """The benchmark, the pair of tasks and the text tokenizer (when a stream is text)."""

    bench: Any
    tasks: tuple[TaskSpec, TaskSpec]
    text_tokenizer: Any = None

    @property
    def pair(self) -> tuple[str, str]:
        return self.tasks[0].modality, self.tasks[1].modality

    def dataset(self, stream: int, split: str):
        t = self.tasks[stream]
        return self.bench.dataset(t.modality, t.name, split)

    def loader(self, split: str, batch_size: int, seed: int, shuffle: bool, drop_last: bool = False):
        from workbench.data import make_paired_loader

        return make_paired_loader(
            self.dataset(0, split), self.dataset(1, split), batch_size, shuffle=shuffle, seed=seed,
            text_tokenizer=self.text_tokenizer, drop_last=drop_last,
        )  # fmt: skip


def fusion_pair(cfg: Config) -> tuple[str, str]:
    """The two modalities of the study: ``data.modalities`` when it names exactly two, else image + audio."""
    mods = tuple(cfg.data.modalities)
    return mods if len(mods) == 2 else DEFAULT_PAIR  # type: ignore[return-value]


def load_fusion_data(cfg: Config, pair: Sequence[str] | None = None, task: str = "digit") -> FusionData:
    """Load the benchmark for the two modalities of ``pair`` (default :func:`fusion_pair`) and their
    ``task`` (which must exist in both and carry the same labels, e.g. ``digit``)."""
    from workbench.data import load_benchmark

    pair = tuple(pair or fusion_pair(cfg))
    if len(pair) != 2 or pair[0] == pair[1]:
        raise ConfigError(f"a fusion pair is two different modalities, got {list(pair)}")
    data_cfg = replace(cfg.data, modalities=list(pair))
    bench = load_benchmark(data_cfg, seed=cfg.seed)
    tasks = (bench.task(pair[0], task), bench.task(pair[1], task))
    tokenizer = None
    if any(bench.dataset(t.modality, t.name, "train").input_kind == "strings" for t in tasks):
        from workbench.model.text_tokenizer import TextTokenizer

        tokenizer = TextTokenizer.for_model(bench.text_corpus("train"), cfg.model)
    return FusionData(bench, tasks, tokenizer)


# ------------------------------------------------------------------------------------------ training
@dataclass
class FusionRun:
    model: PairClassifier
    history: list[dict[str, float]]  # one record per logged step: step, loss, lr
    seconds: float


def train_fusion(
    cfg: Config,
    strategy: str,
    steps: int | None = None,
    *,
    data: FusionData | None = None,
    readout: str = "logits",
    modality_dropout: float = 0.0,
    log_every: int | None = None,
    threads: int | None = 1,
) -> FusionRun:
    """Train one strategy on aligned train pairs for ``steps`` updates (default ``train.steps``).

    Seeded by ``cfg.seed`` (weights, pair order, modality dropout); AdamW with ``train.lr``,
    ``train.weight_decay``, ``train.betas``, ``train.clip_grad`` and ``train.batch_size`` pairs per
    update; linear warm-up (``train.warmup_steps``, capped at a tenth of the run) then cosine decay to
    ``train.min_lr_ratio``. Cross-entropy on the fused logits. fp32 (the study is small; CPU), on
    ``threads`` torch threads (see :func:`torch_threads`).
    """
    with torch_threads(threads):
        return _train(cfg, strategy, steps, data, readout, modality_dropout, log_every)


def _train(
    cfg: Config, strategy: str, steps: int | None, data: FusionData | None, readout: str,
    modality_dropout: float, log_every: int | None,
) -> FusionRun:  # fmt: skip
    from workbench.seeding import seed_everything
    from workbench.train.loop import warmup_cosine

    t = cfg.train
    steps = steps or t.steps
    if not 0.0 <= modality_dropout <= 1.0:
        raise ConfigError(f"modality_dropout={modality_dropout} must be in [0, 1]")
    data = data or load_fusion_data(cfg)
    seed_everything(cfg.seed)
    model = PairClassifier(cfg, strategy, data.tasks, readout)
    model.net.text_tokenizer = data.text_tokenizer
    model.train()
    optimizer = torch.optim.AdamW(model.optimizer_groups(t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    warmup = min(t.warmup_steps, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, steps, t.min_lr_ratio))
    rng = torch.Generator().manual_seed(cfg.seed)  # modality dropout draws, independent of data order
    loader = data.loader("train", t.batch_size, cfg.seed, shuffle=True, drop_last=True)
    log_every = log_every or max(1, steps // 20)
    history: list[dict[str, float]] = []
    t0, step = time.perf_counter(), 0
    while step < steps:
        for a, b in loader:
            pair: list[Batch | None] = [a, b]
            if modality_dropout and float(torch.rand((), generator=rng)) < modality_dropout:
                pair[int(torch.randint(2, (), generator=rng))] = None
            logits = model(*pair)
            loss = F.cross_entropy(logits, a.y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % log_every == 0 or step == steps:
                history.append({"step": step, "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0]})
            if step >= steps:
                break
    model.eval()
    return FusionRun(model, history, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_fusion(
    model: PairClassifier,
    data: FusionData,
    *,
    snr_db: Sequence[float] = DEFAULT_SNR_DB,
    split: str = "test",
    batch_size: int = 256,
    eval_seed: int = 0,
    extra: dict[str, Any] | None = None,
    threads: int | None = 1,
) -> list[dict[str, Any]]:
    """Accuracy (torchmetrics, micro) on aligned ``split`` pairs under every condition of :func:`conditions`.

    Rows: ``{strategy, readout, **extra, condition, modality, corruption, snr_db, accuracy, n}`` with
    ``extra`` e.g. ``{"seed": 0}``. One pair per ``split`` item of A (B's items of the same digit are
    drawn evenly, some twice when B has fewer), so ``n`` is A's split size. Pairs and noise are seeded
    by ``eval_seed`` only.
    """
    from torchmetrics.classification import MulticlassAccuracy

    model.eval()
    discrete = [model.net.patchers[m].discrete for m in data.pair]
    rows = []
    for cond in conditions(data.pair, snr_db, discrete):
        metric = MulticlassAccuracy(model.num_classes, average="micro")
        noise = torch.Generator().manual_seed(eval_seed + 1)  # the same draws for every model
        n = 0
        with torch_threads(threads):
            for a, b in data.loader(split, batch_size, eval_seed, shuffle=False):
                logits = model(*cond.apply(a, b, noise))
                metric.update(logits.argmax(-1), a.y)
                n += len(a)
        rows.append(
            {
                "strategy": model.strategy,
                "readout": model.readout,
                **(extra or {}),
                "condition": cond.name,
                "modality": "" if cond.stream is None else data.pair[cond.stream],
                "corruption": cond.corruption,
                "snr_db": cond.snr_db,
                "accuracy": float(metric.compute()),
                "n": n,
            }
        )
    return rows


def run_study(
    cfg: Config,
    seeds: Sequence[int],
    steps: int | None = None,
    *,
    strategies: Sequence[str] = STRATEGIES,
    snr_db: Sequence[float] = DEFAULT_SNR_DB,
    readout: str = "logits",
    modality_dropout: float = 0.0,
    data: FusionData | None = None,
    threads: int | None = 1,
    log=print,
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], FusionRun]]:
    """Every (strategy, seed): train, then evaluate. Returns the tidy table and the runs.

    The data (the benchmark built for ``cfg.seed``, and the test pairs) is the same for every seed:
    seeds vary the weights, the order of the training pairs and the pairing of the training split.
    """
    data = data or load_fusion_data(cfg)
    table: list[dict[str, Any]] = []
    runs: dict[tuple[str, int], FusionRun] = {}
    for seed in seeds:
        seeded = replace(cfg, seed=seed)
        for strategy in strategies:
            run = train_fusion(seeded, strategy, steps, data=data, readout=readout,
                               modality_dropout=modality_dropout, threads=threads)  # fmt: skip
            t0 = time.perf_counter()
            rows = evaluate_fusion(run.model, data, snr_db=snr_db, extra={"seed": seed}, threads=threads)
            table += rows
            runs[(strategy, seed)] = run
            if log:
                both = next(r["accuracy"] for r in rows if r["condition"] == "both")
                log(f"{strategy:6s} seed {seed}: trained {run.seconds:5.1f} s (loss {run.history[-1]['loss']:.3f}), "
                    f"scored {time.perf_counter() - t0:4.1f} s, test accuracy (both) {both:.3f}")  # fmt: skip
    return table, runs


def summarize(table: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample sd (ddof=1; 0 for one seed) of accuracy per (strategy, condition), in table order."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in table:
        groups.setdefault((r["strategy"], r["condition"]), []).append(r["accuracy"])
    out = []
    for (strategy, condition), values in groups.items():
        mean, sd = mean_spread(values)
        out.append(
            {"strategy": strategy, "condition": condition, "mean": mean, "sd": sd, "seeds": len(values)}
        )
    return out
