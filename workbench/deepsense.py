"""DeepSense-v2 (METHOD.md section 4) as a runnable seed system: aligned pre-training, cross-modal retrieval.

The network is :class:`~workbench.model.deepsense.DeepSense` (modality-specific encoders: hierarchical
ViT, Conformer, causal decoder-only text transformer, per-frame ViT for video; cross-attention fusion;
see that module for the architecture and the choice of objectives). This module holds the data, the
training function, the retrieval evaluation and the study.

**Pairs.** Each entry of ``deepsense.pairs`` (default ``text->image``, ``audio->image``,
``text->video``) is a stream of label-aligned pairs (``data.pairing=aligned``:
:func:`~workbench.data.make_paired_loader` gives every query-side item a gallery-side partner showing
the same digit), taken from each modality's ``digit`` task. The study always pairs by label, whatever
``data.pairing`` says (as the fusion study does): contrastive alignment needs pairs that agree.

**Training** (:func:`train_deepsense`): the seed's recipe, scaled to this CPU. AdamW (``train.lr``,
``train.betas``, ``train.weight_decay``; no decay on biases, norms, mask tokens, temperature); linear
warm-up for ``train.warmup_steps`` (capped at a tenth of the run) then cosine decay to the floor
``train.min_lr_ratio * train.lr`` (the workbench's :func:`~workbench.train.loop.warmup_cosine`);
gradient accumulation over ``train.grad_accum`` micro-batches per update; gradient clipping at
``train.clip_grad``. A micro-batch holds ``train.batch_size`` pairs of EVERY pair, and the update
minimises ``sum over pairs and losses of deepsense.loss_weights[loss] * loss`` (losses stay a dict
until this one weighting; each is logged as ``loss/<loss>/<pair>``). After every update the learned
log-temperature is clamped (CLIP). Seeded by ``cfg.seed`` (weights, masks, pair order); fp32 on
``threads`` torch threads. The seed's own numbers: peak 5e-4, 10,000 warm-up steps, cosine to 1e-6,
accumulation over 8 steps, global batch 2048 on 32 devices (PyTorch FSDP), which ``configs/deepsense.yaml``
scales down.

**Retrieval** (:func:`evaluate_retrieval`): for each pair ``q->g``, every ``split`` item of modality
``q`` is a query and every ``split`` item of modality ``g`` is in the gallery (all of them, not only
aligned partners), ranked by the cosine similarity of the contrastive embeddings. **A gallery item is
relevant to a query when it shows the same digit**, so each query has about a tenth of the gallery
relevant. Metrics come from ``torchmetrics.retrieval``:

* ``R@K`` = ``RetrievalHitRate(top_k=K)``: the share of queries with at least one relevant item in
  the top K. This is the "Recall@K" of cross-modal retrieval papers (CLIP; text-to-video), written for
  one ground-truth item per query. ``RetrievalRecall`` does not fit here: it divides by the number of
  relevant items (~gallery / 10), so R@1 could never exceed 1 / (gallery / 10).
* ``MRR`` = ``RetrievalMRR``: the mean over queries of 1 / rank of the first relevant item.

Chance levels (:func:`chance_levels`) are the exact expectations under a uniformly random ranking, from
each query's number of relevant items (about 0.1 for R@1 and far higher for R@10).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.config import DEEPSENSE_PAIR_SEP, Config
from workbench.hardware import torch_threads
from workbench.model.deepsense import DeepSense, parse_pairs
from workbench.stats import mean_spread


# ------------------------------------------------------------------------------------------ data
@dataclass
class DeepSenseData:
    """The benchmark, the (query, gallery) pairs and the text tokenizer (when a modality is text)."""

    bench: Any
    pairs: list[tuple[str, str]]
    text_tokenizer: Any = None
    task: str = "digit"  # the task whose datasets supply the items (and whose labels are the digits)

    @property
    def modalities(self) -> list[str]:
        return list(dict.fromkeys(m for pair in self.pairs for m in pair))

    def dataset(self, modality: str, split: str):
        return self.bench.dataset(modality, self.task, split)

    def loader(self, pair: tuple[str, str], split: str, batch_size: int, seed: int, shuffle: bool,
               drop_last: bool = False):  # fmt: skip
        """``(query Batch, gallery Batch)`` tuples whose rows show the same digit."""
        from workbench.data import make_paired_loader

        return make_paired_loader(self.dataset(pair[0], split), self.dataset(pair[1], split), batch_size,
                                  shuffle=shuffle, seed=seed, text_tokenizer=self.text_tokenizer,
                                  drop_last=drop_last)  # fmt: skip

    def single_loader(self, modality: str, split: str, batch_size: int):
        """Every ``split`` item of one modality, in order (queries or gallery of retrieval)."""
        from workbench.data import make_loader

        return make_loader(self.dataset(modality, split), batch_size, shuffle=False, seed=0,
                           text_tokenizer=self.text_tokenizer)  # fmt: skip


def load_deepsense_data(cfg: Config, task: str = "digit") -> DeepSenseData:
    """Load the benchmark for every modality of ``deepsense.pairs`` (seeded by ``cfg.seed``) and train
    the text tokenizer on the training texts when text is among them (``model.text_vocab_size``)."""
    from workbench.data import load_benchmark

    pairs = parse_pairs(cfg.deepsense.pairs)
    modalities = list(dict.fromkeys(m for pair in pairs for m in pair))
    bench = load_benchmark(replace(cfg.data, modalities=modalities), seed=cfg.seed)
    tokenizer = None
    if any(bench.dataset(m, task, "train").input_kind == "strings" for m in modalities):
        from workbench.model.text_tokenizer import TextTokenizer

        tokenizer = TextTokenizer.for_model(bench.text_corpus("train"), cfg.model)
    return DeepSenseData(bench, pairs, tokenizer, task)


def notebook_parameters() -> dict[str, Any]:
    """Dotted config keys notebook 22 sets underneath its parameters (so a user's ``overrides`` still win):
    label-aligned pairing, fp32, and the seed's cosine floor (1e-6 / 5e-4), as in ``configs/deepsense.yaml``."""
    return {"data.pairing": "aligned", "train.min_lr_ratio": 0.002, "train.mixed_precision": "no"}


def pair_name(pair: tuple[str, str]) -> str:
    return DEEPSENSE_PAIR_SEP.join(pair)


# ------------------------------------------------------------------------------------------ training
@dataclass
class DeepSenseRun:
    model: DeepSense
    history: list[dict[str, float]]  # per logged update: step, loss (weighted total), lr, temperature, loss/*
    seconds: float


def _forever(loader) -> Iterator:
    """Epoch after epoch of a shuffling loader (its generator draws a new order every epoch)."""
    while True:
        yield from loader


def train_deepsense(
    cfg: Config,
    steps: int | None = None,
    *,
    data: DeepSenseData | None = None,
    log_every: int | None = None,
    threads: int | None = 1,
) -> DeepSenseRun:
    """Pre-train DeepSense-v2 for ``steps`` optimiser updates (default ``train.steps``); see the module
    docstring for the recipe. Returns the model (in eval mode), the history and the training time."""
    with torch_threads(threads):
        return _train(cfg, steps or cfg.train.steps, data or load_deepsense_data(cfg), log_every)


def _train(cfg: Config, steps: int, data: DeepSenseData, log_every: int | None) -> DeepSenseRun:
    from workbench.seeding import seed_everything
    from workbench.train.loop import TrainingDiverged, warmup_cosine

    t, weights = cfg.train, cfg.deepsense.loss_weights
    seed_everything(cfg.seed)
    model = DeepSense(cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.optimizer_groups(t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    warmup = min(t.warmup_steps, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, steps, t.min_lr_ratio))
    streams = {pair: _forever(data.loader(pair, "train", t.batch_size, cfg.seed, shuffle=True, drop_last=True))
               for pair in data.pairs}  # fmt: skip
    log_every = log_every or max(1, steps // 20)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        logged: dict[str, float] = {}
        for _ in range(t.grad_accum):  # micro-batches of one update
            total = torch.zeros(())
            for pair in data.pairs:
                a, b = next(streams[pair])
                losses = model(a, b)  # {"contrastive": ..., "<modality>": ...}, unweighted
                for k, v in losses.items():
                    key = f"loss/{k}/{pair_name(pair)}"
                    logged[key] = logged.get(key, 0.0) + float(v.detach()) / t.grad_accum
                total = total + sum(weights[k] * v for k, v in losses.items())
            if not torch.isfinite(total):
                raise TrainingDiverged(f"DeepSense loss is {float(total)} at update {step}: {logged}")
            (total / t.grad_accum).backward()
            logged["loss"] = logged.get("loss", 0.0) + float(total.detach()) / t.grad_accum
        if t.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        optimizer.step()
        scheduler.step()
        model.clamp_logit_scale_()
        if step % log_every == 0 or step == steps:
            history.append({"step": step, "loss": logged.pop("loss"), "lr": scheduler.get_last_lr()[0],
                            "temperature": model.temperature, **logged})  # fmt: skip
    model.eval()
    return DeepSenseRun(model, history, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ retrieval
def retrieval_scores(
    scores: Tensor, query_labels: Tensor, gallery_labels: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """``{"R@K": hit rate at K, ..., "MRR": ...}`` of a (Q, G) score matrix (higher = more similar).

    Gallery item j is relevant to query i when ``gallery_labels[j] == query_labels[i]``. A query with
    no relevant item scores 0 (torchmetrics' ``empty_target_action="neg"``). Scores are shifted to be
    positive first (ranks unchanged): torchmetrics' MRR counts an item scored <= 0 as NOT relevant
    (``target = where(preds > 0, target, 0)`` in 1.9), which would corrupt it for cosine similarities.
    """
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR

    Q, G = scores.shape
    preds = scores.double().flatten()  # (Q*G,)
    preds = preds - preds.min() + 1.0  # >= 1 everywhere: see above
    target = (query_labels[:, None] == gallery_labels[None, :]).flatten()  # (Q*G,) bool
    indexes = torch.arange(Q).repeat_interleave(G)  # (Q*G,) which query each score belongs to
    out = {f"R@{k}": float(RetrievalHitRate(top_k=k)(preds, target, indexes=indexes)) for k in ks}
    out["MRR"] = float(RetrievalMRR()(preds, target, indexes=indexes))
    return out


def chance_levels(
    query_labels: Tensor, gallery_labels: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """The expected :func:`retrieval_scores` of a uniformly random ranking (exact, not sampled).

    For a query with r relevant items in a gallery of G: ``P(hit@K) = 1 - C(G-r, K) / C(G, K)`` and
    ``E[1/rank of the first relevant] = sum_i (1/i) C(G-i, r-1) / C(G, r)``; averaged over queries.
    """
    G = len(gallery_labels)
    relevant = (query_labels[:, None] == gallery_labels[None, :]).sum(1).tolist()  # (Q,) r per query
    out: dict[str, float] = {}
    for k in ks:
        hit = [1 - math.comb(G - r, k) / math.comb(G, k) if r else 0.0 for r in relevant]
        out[f"R@{k}"] = sum(hit) / len(hit)
    mrr = {r: sum(math.comb(G - i, r - 1) / (i * math.comb(G, r)) for i in range(1, G - r + 2)) if r else 0.0
           for r in set(relevant)}  # fmt: skip
    out["MRR"] = sum(mrr[r] for r in relevant) / len(relevant)
    return out


@torch.no_grad()
def embed_split(model: DeepSense, data: DeepSenseData, modality: str, split: str = "test",
                batch_size: int = 256) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(embeddings (N, w) L2-normalised, digits (N,))`` of every ``split`` item of ``modality``."""
    model.eval()
    zs, digits = [], []
    for batch in data.single_loader(modality, split, batch_size):
        zs.append(model.embed(batch))
        digits.append(batch.digit)
    return torch.cat(zs), torch.cat(digits)


@torch.no_grad()
def similarity_by_label(model: DeepSense, data: DeepSenseData, pair: tuple[str, str], split: str = "test",
                        threads: int | None = 1) -> Tensor:  # fmt: skip
    """(C, C) mean cosine similarity between queries of digit i and gallery items of digit j (C = 10):
    a diagonal that stands out is what retrieval by label needs."""
    with torch_threads(threads):
        zq, lq = embed_split(model, data, pair[0], split)
        zg, lg = embed_split(model, data, pair[1], split)
    C = int(max(lq.max(), lg.max())) + 1
    oq, og = F.one_hot(lq, C).float(), F.one_hot(lg, C).float()  # (Q, C), (G, C)
    sums = oq.T @ (zq @ zg.T) @ og  # (C, C) summed similarities
    return sums / (oq.sum(0)[:, None] * og.sum(0)[None, :]).clamp(min=1)


def evaluate_retrieval(
    model: DeepSense,
    data: DeepSenseData,
    *,
    split: str = "test",
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
    extra: dict[str, Any] | None = None,
    threads: int | None = 1,
) -> list[dict[str, Any]]:
    """Cross-modal retrieval on ``split`` for every pair of ``data`` (query->gallery; see the module
    docstring). Tidy rows: ``{**extra, direction, metric, value, chance, queries, gallery}``."""
    rows: list[dict[str, Any]] = []
    with torch_threads(threads):
        cache = {m: embed_split(model, data, m, split, batch_size) for m in data.modalities}
        for q, g in data.pairs:
            (zq, lq), (zg, lg) = cache[q], cache[g]
            scores = retrieval_scores(zq @ zg.T, lq, lg, ks)  # cosine similarities (Q, G)
            chance = chance_levels(lq, lg, ks)
            rows += [{**(extra or {}), "direction": pair_name((q, g)), "metric": name, "value": value,
                      "chance": chance[name], "queries": len(lq), "gallery": len(lg)}
                     for name, value in scores.items()]  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------ the study
def run_study(
    cfg: Config,
    seeds: Sequence[int],
    steps: int | None = None,
    *,
    data: DeepSenseData | None = None,
    threads: int | None = 1,
    log=print,
) -> tuple[list[dict[str, Any]], dict[int, DeepSenseRun]]:
    """Per seed: pre-train, then score retrieval on the test split. Returns the tidy table and the runs.

    The data (the benchmark built for ``cfg.seed``) is the same for every seed: seeds vary the weights,
    the masks and the order and pairing of the training pairs.
    """
    data = data or load_deepsense_data(cfg)
    table: list[dict[str, Any]] = []
    runs: dict[int, DeepSenseRun] = {}
    for seed in seeds:
        run = train_deepsense(replace(cfg, seed=seed), steps, data=data, threads=threads)
        t0 = time.perf_counter()
        rows = evaluate_retrieval(run.model, data, ks=cfg.deepsense.recall_at, extra={"seed": seed},
                                  threads=threads)  # fmt: skip
        table += rows
        runs[seed] = run
        if log:
            r1 = ", ".join(f"{r['direction']} {r['value']:.3f} (chance {r['chance']:.3f})"
                           for r in rows if r["metric"] == "R@1")  # fmt: skip
            log(f"seed {seed}: trained {run.seconds:5.1f} s (loss {run.history[-1]['loss']:.3f}, temperature "
                f"{run.model.temperature:.3f}), scored {time.perf_counter() - t0:4.1f} s; test R@1: {r1}")  # fmt: skip
    return table, runs


def summarize(table: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample sd (ddof=1; 0 for one seed) per (direction, metric), in table order, with chance."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in table:
        groups.setdefault((r["direction"], r["metric"]), []).append(r)
    out = []
    for (direction, metric), rows in groups.items():
        values = [r["value"] for r in rows]
        mean, sd = mean_spread(values)
        out.append({"direction": direction, "metric": metric, "mean": mean, "sd": sd,
                    "chance": rows[0]["chance"], "seeds": len(values)})  # fmt: skip
    return out


def retrieval_table(summary: Sequence[dict[str, Any]], scale: float = 100.0, digits: int = 1) -> dict:
    """One row per direction, one column per metric (``mean ± sd``, in % by default), then chance."""
    metrics = list(dict.fromkeys(r["metric"] for r in summary))
    cells: dict[str, dict[str, str]] = {}
    chance: dict[str, dict[str, float]] = {}
    for r in summary:
        spread = f" ± {r['sd'] * scale:.{digits}f}" if r["seeds"] > 1 else ""
        text = f"{r['mean'] * scale:.{digits}f}{spread}"
        cells.setdefault(r["direction"], {})[r["metric"]] = text
        chance.setdefault(r["direction"], {})[r["metric"]] = round(r["chance"] * scale, digits)
    rows = [[d, *[cells[d][m] for m in metrics], *[chance[d][m] for m in metrics]] for d in cells]
    return {"columns": ["direction", *metrics, *[f"chance {m}" for m in metrics]], "rows": rows}
