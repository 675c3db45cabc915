"""Adaptation to an unseen dataset (OmniVec2 paper, section 4.2).

The trained network is frozen; two fully connected layers are trained on a small fraction (10% by
default, stratified per class) of the new dataset's training split, on the network's single-stream
embedding, and scored on its test split. What the two layers read (``features``):

- ``network`` (default): the means over valid tokens of the tokenizer's output, of ``f``'s and of
  ``g``'s, side by side (3 x width). Reading several depths is the linear-probe habit (DINO's
  evaluation concatenates the last blocks' outputs): on three unseen datasets it beat ``last`` on
  every one's validation split (RESULTS.md).
- ``last``: the mean of ``g(f(x))`` alone (:meth:`OmniVec2.features`, what retrieval reads).
- ``random``, a reference: the ``network`` readout of the checkpoint's architecture with freshly
  initialised, seeded weights, so the difference is what the training earned.
- ``input``, a reference: the network's front end with no learned weights (standardised pixels; for
  audio the mean and the standard deviation of every bin of the normalised log-mel over time).

Because the network is frozen, the embeddings are computed once and the two layers train on them
directly: the same optimum as pushing every batch through the frozen network, at a fraction of the
cost. Datasets: FSDD speech (``fsdd``, speaker-disjoint test split), MNIST-format IDX directories
such as Fashion-MNIST (``idx``), and scikit-learn's bundled UCI handwritten digits drawn as MNIST is
(``uci-digits``, no directory: the third dataset of the readout's selection).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from workbench.config import DataConfig, load_config, read_saved_config
from workbench.errors import ConfigError
from workbench.paths import cache_dir
from workbench.seeding import seed_everything

READS_DIRECTORY = ("fsdd", "idx")  # the datasets read from a directory; uci-digits comes with scikit-learn
DATASETS = (*READS_DIRECTORY, "uci-digits")
FEATURES = ("network", "last", "random", "input")


@dataclasses.dataclass
class AdaptResult:
    """One adaptation's figures and every setting that produced them (the JSON beside a result)."""

    dataset: str
    task: str
    features: str
    fraction: float
    train_samples: int
    test_samples: int
    accuracy: float
    macro_f1: float
    seconds: float
    checkpoint: str = ""
    directory: str = ""
    seed: int = 0
    epochs: int = 0
    hidden: int = 0
    lr: float = 0.0
    overrides: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_new_dataset(kind: str, directory: str | Path | None, data: DataConfig, seed: int):
    """The TaskData of an unseen dataset read from ``directory`` (``uci-digits`` reads none)."""
    from workbench.data.sources import load_fsdd, load_idx_dir, load_uci_digits

    if kind == "fsdd":
        cfg = dataclasses.replace(data, audio_source="fsdd", fsdd_dir=str(directory))
        _, table = load_fsdd(cfg, seed, cache_dir(data.cache_dir))
        return table
    if kind == "idx":
        name = "fashion" if "fashion" in str(directory).lower() else "idx"
        return load_idx_dir(Path(directory), name, seed)
    if kind == "uci-digits":  # bundled with scikit-learn: ``directory`` is not read
        return load_uci_digits(seed)
    raise ConfigError(f"unknown adaptation dataset {kind!r}; choose one of {list(DATASETS)}")


def _subset(dataset, fraction: float, seed: int):
    """A stratified, seeded ``fraction`` of a TaskDataset's rows (at least one per class)."""
    labels = dataset.labels.numpy()
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = rows[np.random.default_rng([seed, 4, int(c)]).permutation(len(rows))]
        keep.append(rows[: max(1, round(len(rows) * fraction))])
    sub = copy.copy(dataset)
    sub.rows = dataset.rows[torch.from_numpy(np.sort(np.concatenate(keep)))]
    return sub


def input_features(model, batch) -> torch.Tensor:
    """The network's front end alone, no learned weights: (B, k). A fixed-size input (image, video)
    gives its standardised patch values, flattened; a clip (rows of different lengths) gives the mean
    and the standard deviation of every bin of its normalised log-mel over the clip's time patches."""
    if batch.modality == "text":
        raise ConfigError("features='input' needs a signal (image, audio, video); text is token ids")
    patcher = model.patchers[batch.modality]
    p = patcher(batch.x, batch.lengths)
    values = p.values.float()
    if batch.lengths is None:
        return values.flatten(1)
    (gt, gf), pt, B = p.grid, patcher.patch_shape[0], values.shape[0]
    spec = patcher._spectrogram(values)  # (B, frames, bins): the patcher's own inverse of its patching
    keep = torch.ones(B, gt) if p.padding is None else (~p.padding).reshape(B, gt, gf)[..., 0].float()
    keep = keep.repeat_interleave(pt, 1)[..., None]  # (B, frames, 1)
    n = keep.sum(1)
    mean = (spec * keep).sum(1) / n
    std = (((spec - mean[:, None]) ** 2 * keep).sum(1) / n).sqrt()
    return torch.cat([mean, std], -1)


def network_features(model, batch) -> torch.Tensor:
    """(B, 3 w): the means over valid tokens of the tokens entering ``f``, of ``f``'s output and of
    ``g``'s, side by side (the last third is :meth:`OmniVec2.features`)."""
    from workbench.model.heads import masked_mean

    p, x, _ = model.tokenize(batch)
    fx = model.f(x, p.padding)
    gx = model.g(fx, p.padding)
    return torch.cat([masked_mean(t, p.padding) for t in (x, fx, gx)], -1)


@torch.no_grad()
def embed(
    model, dataset, batch_size: int = 256, features: str = "network"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen single-stream embeddings (N, k) and labels (N,) of a TaskDataset, read as ``features``
    names (``network`` and ``random`` alike: :func:`network_features`)."""
    from workbench.data import make_loader

    model.eval()
    read = {"input": input_features, "last": lambda m, b: m.features(b)}.get(features, network_features)
    feats, labels = [], []
    for batch in make_loader(dataset, batch_size, shuffle=False, seed=0, text_tokenizer=model.text_tokenizer):
        feats.append(read(model, batch).float())
        labels.append(batch.y)
    return torch.cat(feats), torch.cat(labels)


def _fresh_like(model, seed: int):
    """The checkpoint's architecture and text tokenizer with seeded, freshly initialised weights."""
    from workbench.model import OmniVec2

    torch.manual_seed(seed)
    fresh = OmniVec2(model.config, list(model.tasks.values()))
    fresh.text_tokenizer = model.text_tokenizer
    return fresh.requires_grad_(False)


def adapt(
    checkpoint: str | Path,
    kind: str,
    directory: str | Path | None = None,
    *,
    fraction: float = 0.1,
    epochs: int = 200,
    hidden: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    features: str = "network",
    overrides: Sequence[str] = (),
) -> AdaptResult:
    """Freeze ``checkpoint``'s network, train two FC layers on ``fraction`` of a new dataset, test it.
    ``features``: ``network`` (the checkpoint's, three depths), ``last`` (``g``'s output only),
    ``random`` (its architecture, fresh weights) or ``input`` (its front end alone); see the module.
    ``overrides``: ``data.*`` settings over the checkpoint's, e.g. ``data.fsdd_holdout_speakers=[george]``
    (the network is the checkpoint's, so nothing else may be overridden)."""
    from workbench.data.benchmark import TaskDataset
    from workbench.model import OmniVec2

    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction={fraction} must be in (0, 1]")
    if epochs < 1:
        raise ConfigError(f"epochs={epochs} must be at least 1")
    if features not in FEATURES:
        raise ConfigError(f"unknown features {features!r}; choose one of {list(FEATURES)}")
    if kind in READS_DIRECTORY and not directory:
        raise ConfigError(f"the {kind} dataset is read from a directory; give one (--dir)")
    not_data = [o for o in overrides if not o.startswith("data.")]
    if not_data:
        raise ConfigError(f"adapt takes data.* overrides only (the network is the checkpoint's): {not_data}")
    started = time.perf_counter()
    seed_everything(seed)
    model = OmniVec2.from_pretrained(checkpoint).requires_grad_(False)
    data_cfg = load_config(base=read_saved_config(Path(checkpoint) / "config.json"), overrides=overrides).data
    table = load_new_dataset(kind, directory, data_cfg, seed)
    spec = table.spec
    if spec.modality not in model.modalities:
        raise ConfigError(f"the checkpoint has no {spec.modality} tokenizer; it knows {model.modalities}")
    train = _subset(TaskDataset(table, "train"), fraction, seed)
    test = TaskDataset(table, "test")
    if features == "random":
        model = _fresh_like(model, seed)
    x_train, y_train = embed(model, train, features=features)
    x_test, y_test = embed(model, test, features=features)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # standardise with training statistics only

    head = nn.Sequential(nn.Linear(x_train.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, spec.num_classes))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    xs = (x_train - mean) / std
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(head(xs[idx]), y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        pred = head((x_test - mean) / std).argmax(-1)
    acc = MulticlassAccuracy(spec.num_classes, average="micro")(pred, y_test).item()
    f1 = MulticlassF1Score(spec.num_classes, average="macro")(pred, y_test).item()
    return AdaptResult(
        kind, spec.key, features, fraction, len(train), len(test), acc, f1, time.perf_counter() - started,
        checkpoint=str(Path(checkpoint).resolve()), directory=str(Path(directory).resolve()) if directory else "",
        seed=seed, epochs=epochs, hidden=hidden, lr=lr, overrides=list(overrides),
    )  # fmt: skip


def write_result(result: AdaptResult, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
