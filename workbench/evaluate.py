"""Evaluation, single-stream as at inference: ``h_mt(g(f(x)))`` for every (modality, task).

Metrics come from torchmetrics: accuracy and macro-F1 (and the confusion matrix) for classification;
PSNR for dense image tasks, averaged per image, beside the PSNR of the corrupted input so the gain is
visible. Under data parallelism every process evaluates a shard and ``gather_for_metrics`` collects
predictions (dropping the padding duplicates Accelerate adds to even out the last batch).

torchmetrics is imported by :func:`evaluate` itself: its package root imports scipy.signal and, where
installed, transformers (~5 s of a process's start on this CPU), which stages 1 and 2 (masked loss
only, :func:`evaluate_masked`) never need.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import Dataset

from workbench.config import Config
from workbench.errors import ConfigError
from workbench.modalities import TaskSpec


def _loader(bench, spec: TaskSpec, split: str, model, batch_size: int, accelerator: Accelerator | None,
            dataset=None):  # fmt: skip
    from workbench.data import make_loader

    loader = make_loader(
        dataset if dataset is not None else bench.dataset(spec.modality, spec.name, split), batch_size,
        shuffle=False, seed=0, text_tokenizer=model.text_tokenizer,
    )  # fmt: skip
    return accelerator.prepare_data_loader(loader) if accelerator is not None else loader


def _cycle(make):
    """Batches of ``make()``'s loader, restarting it when exhausted."""
    while True:
        yield from make()


class SharedInputs(Dataset):
    """The split of several classification tasks that read the same inputs (``audio/digit`` and
    ``audio/language`` are one table of clips with two label columns): items ``(x, y (T,), digit)``, so
    g(f(x)) is computed once per sample for all T heads instead of once per task."""

    def __init__(self, datasets: list):
        first = datasets[0]
        self.first, self.split, self.spec = first, first.split, first.spec
        self.modality, self.task, self.input_kind = first.modality, first.task, first.input_kind
        self.labels = torch.stack([d.labels for d in datasets], dim=1)  # (n, T)

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, i: int):
        x, _, digit = self.first[i]
        return x, self.labels[i], digit


def shared_input_groups(bench, specs: list[TaskSpec], split: str) -> list[list[TaskSpec]]:
    """``specs`` grouped so each group's tasks read the same inputs in the same order (one forward
    serves them all); dense tasks, and tasks whose inputs differ (image/denoise reads corrupted
    images), stay alone. Groups keep the first-seen order."""
    groups: list[list[TaskSpec]] = []
    for spec in specs:
        ds = bench.dataset(spec.modality, spec.name, split)
        for group in groups:
            head = group[0]
            other = bench.dataset(head.modality, head.name, split)
            if (spec.kind == head.kind == "classification" and other.data.x is ds.data.x
                    and torch.equal(other.rows, ds.rows)):  # fmt: skip
                group.append(spec)
                break
        else:
            groups.append([spec])
    return groups


@torch.no_grad()
def evaluate(
    model,
    bench,
    split: str = "test",
    *,
    accelerator: Accelerator | None = None,
    batch_size: int = 256,
    tasks: list[TaskSpec] | None = None,
    confusion: bool = True,
) -> dict[str, dict]:
    """``{"image/digit": {"accuracy", "macro_f1", "n", "confusion"}, "image/denoise": {"psnr", "psnr_input", "n"}}``.

    Tasks that read the same inputs are evaluated in one pass (:func:`shared_input_groups`); each
    head sees exactly the batches it would see alone, so the metrics do not depend on the grouping.
    """
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
    from torchmetrics.image import PeakSignalNoiseRatio

    model.eval()
    specs = tasks or [s for s in bench.tasks if s.key in model.tasks]
    results: dict[str, dict] = {}
    for group in shared_input_groups(bench, specs, split):
        dataset = None
        if len(group) > 1:
            dataset = SharedInputs([bench.dataset(s.modality, s.name, split) for s in group])
        loader = _loader(bench, group[0], split, model, batch_size, accelerator, dataset)
        n = 0
        metrics, baselines = {}, {}
        for spec in group:
            if spec.kind == "classification":
                c = spec.num_classes
                metrics[spec.key] = {
                    "accuracy": MulticlassAccuracy(c, average="micro"),
                    "macro_f1": MulticlassF1Score(c, average="macro"),
                    "confusion": MulticlassConfusionMatrix(c),
                }
            else:
                dims = tuple(range(1, 1 + len(spec.shape)))
                metrics[spec.key] = {"psnr": PeakSignalNoiseRatio(data_range=1.0, dim=dims)}
                baselines[spec.key] = PeakSignalNoiseRatio(data_range=1.0, dim=dims)
        dense = group[0].kind == "dense"
        for batch in loader:
            out = model.forward_single(batch, tasks=[s.name for s in group])
            preds = [out[s.name].float() for s in group]
            y, x = batch.y, batch.x if dense else None
            if accelerator is not None:  # each tensor on its own: the padding duplicates go from every one
                preds = [accelerator.gather_for_metrics(p) for p in preds]
                y = accelerator.gather_for_metrics(y)
                x = accelerator.gather_for_metrics(x) if dense else None
            n += len(y)
            for i, (spec, pred) in enumerate(zip(group, preds)):
                if spec.kind == "classification":
                    target = y[:, i] if dataset is not None else y
                    for m in metrics[spec.key].values():
                        m.update(pred.argmax(-1), target)
                else:
                    metrics[spec.key]["psnr"].update(pred.clamp(0, 1), y)
                    baselines[spec.key].update(x.float().reshape(y.shape).clamp(0, 1), y)
        for spec in group:
            row = {name: m.compute() for name, m in metrics[spec.key].items()}
            if spec.kind == "classification":
                out = {"accuracy": row["accuracy"].item(), "macro_f1": row["macro_f1"].item(), "n": n}
                if confusion:
                    out["confusion"] = row["confusion"].tolist()
            else:
                out = {"psnr": row["psnr"].item(), "psnr_input": baselines[spec.key].compute().item(), "n": n}
            results[spec.key] = out
    return {spec.key: results[spec.key] for spec in specs}


@torch.no_grad()
def evaluate_masked(
    model, bench, split: str, cfg: Config, *, accelerator: Accelerator | None = None, batch_size: int = 256
) -> dict[str, dict]:
    """Masked-prediction loss per modality on a split, with fixed masking noise, through the path the
    stage trained: stage 1 ``forward_masked`` (decoders1); stage 2 ``forward_masked_pair`` (f, A, g,
    A-back, decoders2), each modality fused with the next configured one (itself when alone)."""
    model.eval()
    results: dict[str, dict] = {}
    first = {}  # modality -> its first classification task (its clean inputs)
    for spec in bench.tasks:
        if spec.kind == "classification":
            first.setdefault(spec.modality, spec)
    modalities = list(first)
    ratio = cfg.train.mask_ratio
    for i, modality in enumerate(modalities):
        spec = first[modality]
        generator = torch.Generator().manual_seed(cfg.seed)
        partners = None
        if cfg.train.stage == 2:
            partner = first[modalities[(i + 1) % len(modalities)]]
            partners = _cycle(
                lambda partner=partner: _loader(bench, partner, split, model, batch_size, accelerator)
            )
        total, n = 0.0, 0
        for batch in _loader(bench, spec, split, model, batch_size, accelerator):
            if partners is None:
                out = model.forward_masked(batch, ratio[modality], generator=generator)
            else:
                other = next(partners)
                k = min(len(batch), len(other))  # fusion pairs rows: score the rows that have a partner
                batch, other = batch.slice(0, k), other.slice(0, k)
                out, _ = model.forward_masked_pair(
                    batch, other, ratio[modality], ratio[other.modality], generator=generator
                )
            loss = out.loss.detach().float().reshape(1) * len(batch)
            count = torch.tensor([len(batch)])
            if accelerator is not None:
                loss, count = accelerator.reduce(loss, "sum"), accelerator.reduce(count, "sum")
            total, n = total + loss.item(), n + int(count.item())
        results[spec.modality] = {"masked_loss": total / max(n, 1), "n": n}
    return results


def _group_names(column: str, values: torch.Tensor) -> list[str]:
    """Readable names of a provenance column's values (text templates and eSpeak voice variants by
    name, others as numbers)."""
    if column == "template":
        from workbench.data.phrases import TEMPLATES

        return [TEMPLATES[int(v)].name for v in values]
    if column == "voice":
        from workbench.data.speech import VOICE_VARIANTS

        return [VOICE_VARIANTS[int(v)][0] for v in values]
    return [str(int(v)) for v in values]


@torch.no_grad()
def accuracy_by(model, bench, column: str, split: str = "test", batch_size: int = 256) -> dict[str, dict]:
    """Accuracy of every classification task whose table has the provenance ``column`` (``template``
    for text: which phrasing; ``voice`` for audio), per value: ``{"text/digit": {"minus": {"accuracy",
    "n"}, ...}}``. Single process; a diagnostic beside :func:`evaluate` (which gives the totals)."""
    specs = [s for s in bench.tasks if s.key in model.tasks and s.kind == "classification"]
    specs = [s for s in specs if column in bench.dataset(s.modality, s.name, split).data.info]
    if not specs:
        have = sorted({c for s in bench.tasks for c in bench.dataset(s.modality, s.name, split).data.info})
        raise ConfigError(f"no task of this benchmark has a column {column!r}; columns: {', '.join(have)}")
    model.eval()
    out: dict[str, dict] = {}
    for spec in specs:
        ds = bench.dataset(spec.modality, spec.name, split)
        right = []
        for batch in _loader(bench, spec, split, model, batch_size, None):  # in row order (no shuffle)
            right.append(model.forward_single(batch, tasks=[spec.name])[spec.name].argmax(-1) == batch.y)
        hits = torch.cat(right)
        names = _group_names(column, ds.data.info[column][ds.rows])
        rows: dict[str, list[bool]] = {}
        for name, hit in zip(names, hits.tolist()):
            rows.setdefault(name, []).append(hit)
        out[spec.key] = {name: {"accuracy": sum(r) / len(r), "n": len(r)} for name, r in sorted(rows.items())}
    return out


# The Training issue's targets for the full profile (`small`, stages 1 -> 2 -> 3, test split): the metric
# each is read from and the least value that meets it. ``psnr_gain`` is PSNR over the corrupted input, dB.
TARGETS: dict[str, tuple[str, float]] = {
    "image/digit": ("accuracy", 0.97),
    "audio/digit": ("accuracy", 0.95),
    "text/digit": ("accuracy", 0.98),
    "video/digit": ("accuracy", 0.95),
    "video/motion": ("accuracy", 0.98),
    "image/denoise": ("psnr_gain", 6.0),
}


def target_table(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, list]:
    """Each of :data:`TARGETS` beside the measured value in ``metrics`` (what :func:`evaluate` returns
    for one split), as ``{"columns", "rows"}`` for a report; ``met`` is None for a task not evaluated."""
    rows = []
    for key, (metric, target) in TARGETS.items():
        row = metrics.get(key)
        if row is None:
            value = None
        elif metric == "psnr_gain":
            value = float(row["psnr"]) - float(row["psnr_input"])
        else:
            value = float(row[metric])
        rows.append([key, metric, target, value, None if value is None else value >= target])
    return {"columns": ["task", "metric", "target", "measured", "met"], "rows": rows}


def target_lines(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """:func:`target_table` as aligned text lines (``workbench evaluate --targets``, the stage-3 notebook)."""
    lines = []
    for task, metric, target, value, met in target_table(metrics)["rows"]:
        shown = "not evaluated" if value is None else f"{value:.4f}  " + ("met" if met else "missed")
        lines.append(f"{task:14s} {metric:9s} >= {target:<5g} {shown}")
    return lines
