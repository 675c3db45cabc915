"""An exponential moving average of the network's weights (``train.ema_decay``; Polyak averaging).

After every optimiser update, ``average = d * average + (1 - d) * weights`` with
``d = min(ema_decay, (1 + n) / (10 + n))`` at the n-th update since the run began: the warm-up of
timm's ``ModelEmaV2`` and TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, so the starting
weights fade within a few dozen updates instead of weighing ``ema_decay ** steps`` at the end. The
average is what the run validates, evaluates and saves as its checkpoint; training itself is unchanged
(the loop's weights, optimiser and RNG never see it), so the raw weights stay in ``RUN/state/``.

Built on ``torch.optim.swa_utils.AveragedModel`` (the deep copy, the first-update copy and the update
count); the average is kept in a ``state/<step>/ema.safetensors`` beside Accelerate's state, so a
resumed run continues it exactly. Parameters only: the network's buffers are constants rebuilt from
the config (mel filter banks, windows), copied from the live network as ``AveragedModel`` does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

FILE = "ema.safetensors"


def ema_update(decay: float):
    """``AveragedModel``'s ``multi_avg_fn``: one fused lerp over every parameter, warm-up included."""

    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        n = int(num_averaged)  # updates averaged so far (the first update copies; this is n >= 1)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


class WeightAverage:
    """The moving average of ``model``'s parameters; ``module`` is a network like ``model`` holding it."""

    def __init__(self, model: nn.Module, decay: float):
        self.averaged = AveragedModel(model, multi_avg_fn=ema_update(decay), use_buffers=False)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    @staticmethod
    def saved_in(directory: Path) -> bool:
        return (Path(directory) / FILE).is_file()

    def save(self, directory: Path) -> None:
        tensors = {name: p.detach().contiguous() for name, p in self.module.named_parameters()}
        save_file(tensors, str(Path(directory) / FILE), metadata={"updates": str(self.updates)})

    def load(self, directory: Path) -> None:
        from safetensors import safe_open

        path = Path(directory) / FILE
        params = dict(self.module.named_parameters())
        with safe_open(str(path), "pt") as fh:
            if set(fh.keys()) != params.keys():
                raise KeyError(f"{path} does not hold this network's parameters")
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(fh.get_tensor(name))
            self.averaged.n_averaged.fill_(int(fh.metadata()["updates"]))
