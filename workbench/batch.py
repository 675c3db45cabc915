"""The one batch type that flows from data loaders into the model, the losses and the metrics."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Batch:
    """One (modality, task) batch. Tensor shapes per modality: see :mod:`workbench.modalities`.

    ``digit`` carries the digit shown/spoken/written in every sample when the source knows it (the
    embedded benchmark always does); label-aligned pairing and cross-modal retrieval use it.
    """

    modality: str
    task: str
    x: torch.Tensor  # model input, e.g. (B, 1, 28, 28) images or (B, L) waveforms
    y: torch.Tensor  # (B,) class indices, or the dense target (B, *shape)
    lengths: torch.Tensor | None = None  # (B,) valid samples/tokens for variable-length inputs
    digit: torch.Tensor | None = None  # (B,) the digit in each sample, when known

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def key(self) -> str:
        return f"{self.modality}/{self.task}"

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor (Accelerate's ``send_to_device`` calls this with ``non_blocking``)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(
            self, x=move(self.x), y=move(self.y), lengths=move(self.lengths), digit=move(self.digit)
        )

    def slice(self, start: int, stop: int) -> Batch:
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return replace(self, x=cut(self.x), y=cut(self.y), lengths=cut(self.lengths), digit=cut(self.digit))
