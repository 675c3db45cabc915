"""Evaluation, single-stream as at inference: ``h_mt(g(f(x)))`` for every (modality, task).

Metrics come from torchmetrics: accuracy and macro-F1 (and the confusion matrix) for classification;
PSNR for dense image tasks, averaged per image, beside the PSNR of the corrupted input so the gain is
visible. Under data parallelism every process evaluates a shard and ``gather_for_metrics`` collects
predictions (dropping the padding duplicates Accelerate adds to even out the last batch).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
from torchmetrics.image import PeakSignalNoiseRatio

from workbench.config import Config
from workbench.modalities import TaskSpec


def _loader(bench, spec: TaskSpec, split: str, model, batch_size: int, accelerator: Accelerator | None):
    from workbench.data import make_loader

    loader = make_loader(
        bench.dataset(spec.modality, spec.name, split), batch_size, shuffle=False, seed=0,
        text_tokenizer=model.text_tokenizer,
    )  # fmt: skip
    return accelerator.prepare_data_loader(loader) if accelerator is not None else loader


def _cycle(make):
    """Batches of ``make()``'s loader, restarting it when exhausted."""
    while True:
        yield from make()


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
    """``{"image/digit": {"accuracy", "macro_f1", "n", "confusion"}, "image/denoise": {"psnr", "psnr_input", "n"}}``."""
    model.eval()
    results: dict[str, dict] = {}
    for spec in tasks or [s for s in bench.tasks if s.key in model.tasks]:
        loader = _loader(bench, spec, split, model, batch_size, accelerator)
        n = 0
        if spec.kind == "classification":
            c = spec.num_classes
            metrics = {
                "accuracy": MulticlassAccuracy(c, average="micro"),
                "macro_f1": MulticlassF1Score(c, average="macro"),
                "confusion": MulticlassConfusionMatrix(c),
            }
        else:
            metrics = {"psnr": PeakSignalNoiseRatio(data_range=1.0, dim=tuple(range(1, 1 + len(spec.shape))))}
            baseline = PeakSignalNoiseRatio(data_range=1.0, dim=tuple(range(1, 1 + len(spec.shape))))
        for batch in loader:
            pred = model.forward_single(batch, tasks=[spec.name])[spec.name].float()
            y, x = batch.y, batch.x
            if accelerator is not None:
                pred, y, x = accelerator.gather_for_metrics((pred, y, x))
            n += len(y)
            if spec.kind == "classification":
                for m in metrics.values():
                    m.update(pred.argmax(-1), y)
            else:
                metrics["psnr"].update(pred.clamp(0, 1), y)
                baseline.update(x.float().reshape(y.shape).clamp(0, 1), y)
        row = {name: m.compute() for name, m in metrics.items()}
        if spec.kind == "classification":
            out = {"accuracy": row["accuracy"].item(), "macro_f1": row["macro_f1"].item(), "n": n}
            if confusion:
                out["confusion"] = row["confusion"].tolist()
        else:
            out = {"psnr": row["psnr"].item(), "psnr_input": baseline.compute().item(), "n": n}
        results[spec.key] = out
    return results


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
