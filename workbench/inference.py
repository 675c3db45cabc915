"""Inference on user media: one decoder for every medium, every task head of its modality, single stream.

Shared by ``workbench predict`` and the app (which adds only the UI). A medium goes through
``decode -> Batch of one -> model.forward_single -> readable predictions``; anything wrong with the
medium raises :class:`~workbench.errors.MediaError` with a human message.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.batch import Batch
from workbench.config import LimitsConfig, from_dict, read_saved_config
from workbench.errors import CheckpointError, MediaError
from workbench.modalities import MODALITIES


@dataclass
class Prediction:
    """What every head of one medium's modality says about it."""

    input: str
    modality: str
    tasks: dict[str, dict[str, Any]]  # task -> {"label", "top"} or {"psnr", "image"}
    latency_ms: float

    def to_json(self) -> dict[str, Any]:
        """The ``workbench predict --json`` object (dense outputs are summarised, not dumped)."""
        tasks = {t: {k: v for k, v in out.items() if k != "output"} for t, out in self.tasks.items()}
        return {
            "input": self.input,
            "modality": self.modality,
            "tasks": tasks,
            "latency_ms": round(self.latency_ms, 2),
        }


class Predictor:
    """A loaded checkpoint plus the media limits it was configured with."""

    def __init__(self, model, limits: LimitsConfig | None = None, top_k: int = 3):
        self.model = model.eval()
        self.limits = limits or LimitsConfig()
        self.top_k = top_k

    @classmethod
    def from_checkpoint(cls, directory: str | Path, top_k: int = 3) -> Predictor:
        from workbench.model import OmniVec2

        directory = Path(directory)
        if not (directory / "model.safetensors").is_file():
            raise CheckpointError(
                f"{directory} is not a checkpoint (no model.safetensors); train one with "
                "`workbench train --stage 3 --out runs/demo` and pass runs/demo/checkpoint"
            )
        model = OmniVec2.from_pretrained(directory)
        cfg = from_dict(read_saved_config(directory / "config.json"))
        return cls(model, cfg.data.limits, top_k)

    @property
    def modalities(self) -> list[str]:
        return list(dict.fromkeys(t.modality for t in self.model.tasks.values()))

    def batch(self, modality: str, src: Any) -> Batch:
        """Decode one medium (a path, bytes, or for text a string) into a batch of one."""
        from workbench.data.media import decode

        if modality not in self.modalities:
            known = ", ".join(self.modalities)
            raise MediaError(f"this checkpoint was not trained on {modality} (it knows: {known})")
        x = decode(modality, src, self.limits)
        lengths = None
        if modality == "text":
            if self.model.text_tokenizer is None:
                raise CheckpointError("this checkpoint has no text tokenizer")
            x, lengths = self.model.text_tokenizer.encode([x])
        elif modality == "audio":
            lengths = torch.tensor([x.shape[-1]])
            x = x.unsqueeze(0)
        else:
            x = x.unsqueeze(0)
        return Batch(modality, "", x, torch.zeros(1, dtype=torch.long), lengths)

    @torch.no_grad()
    def predict(self, modality: str, src: Any, name: str | None = None) -> Prediction:
        batch = self.batch(modality, src)
        tic = time.perf_counter()
        outputs = self.model.forward_single(batch)
        latency = (time.perf_counter() - tic) * 1000
        return Prediction(name or _describe(src), modality, self.readable(batch, outputs), latency)

    def readable(self, batch: Batch, outputs: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """Top-k labels for classification heads; the restored image and its PSNR to the input for dense ones."""
        tasks: dict[str, dict[str, Any]] = {}
        for task, out in outputs.items():
            spec = self.model.tasks[f"{batch.modality}/{task}"]
            if spec.kind == "classification":
                probs = out.float().softmax(-1)[0]
                top = probs.topk(min(self.top_k, probs.numel()))
                pairs = [
                    [spec.labels[i], round(p, 4)] for p, i in zip(top.values.tolist(), top.indices.tolist())
                ]
                tasks[task] = {"label": pairs[0][0], "top": pairs}
            else:
                restored = out.float().clamp(0, 1)[0]
                mse = torch.mean((restored - batch.x[0].float().reshape(restored.shape)) ** 2).item()
                psnr = 10 * math.log10(1.0 / max(mse, 1e-10))
                # No clean target exists for an upload: PSNR here measures how much the head changed the input.
                tasks[task] = {"psnr": round(psnr, 2), "output": restored}
        return tasks


def _describe(src: Any) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    return f"<{len(src)} bytes>" if isinstance(src, (bytes, bytearray)) else type(src).__name__


def modality_of(path: str | Path) -> str:
    """The modality a file extension belongs to (``.png`` -> image); MediaError if none does."""
    suffix = Path(path).suffix.lower()
    for name, spec in MODALITIES.items():
        if suffix in spec.extensions and name != "text":
            return name
    raise MediaError(f"{Path(path).name}: unknown media type {suffix!r}")
