"""Task balancing for stage 3: scale each task's loss by how fast it converges (METHOD.md section 2.3).

Losses stay a ``dict[task_key, Tensor]`` until :meth:`TaskBalancer.forward` reduces them (STYLE.md).
Three rules, chosen by ``train.balancer``:

* ``dwa``: Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, eq. 7). With ``L_k(w)`` the mean
  loss of task k over window w and ``r_k = L_k(w-1) / L_k(w-2)`` its descent rate,
  ``lambda_k = K exp(r_k / T) / sum_i exp(r_i / T)``: a task whose loss falls slowly gets more weight.
  The paper's "epoch" is a window of ``window`` optimiser steps here, because stage 3 samples one
  task pair per step rather than sweeping every task each epoch. Weights are 1 until two windows
  have been seen for every task. Rates are capped at ``MAX_RATE`` (see there): without the cap, a task
  whose loss is near zero (a solved task: 0.0005 one window, 0.04 the next) has a rate near 100 and
  takes all the weight, silencing every other task for a window.
* ``uncertainty``: homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018):
  ``sum_k exp(-s_k) L_k + s_k`` with one learnable ``s_k = log sigma_k^2`` per task.
* ``equal``: every weight 1.

The DWA history is plain floats (saved as JSON with the training state); the uncertainty parameters
are ``nn.Parameter``s, so they are trained by the same optimiser and saved with the model state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# The largest DWA descent rate L(w-1) / L(w-2) that counts: a loss that doubled in one window. With
# T = 2 the weight of such a task is then at most e^(1/2) ~ 1.6 times that of a steady one. Measured on
# text alone from a stage-1 checkpoint (text/language solved at loss ~0.001, text/digit at ~2.07): the
# uncapped rule set text/digit's weight to exactly 0 for whole windows when text/language's loss
# jumped from 0.001 to 0.04.
MAX_RATE = 2.0


class TaskBalancer(nn.Module):
    def __init__(
        self, task_keys: Sequence[str], rule: str = "dwa", temperature: float = 2.0, window: int = 20
    ):
        super().__init__()
        self.keys = list(task_keys)
        self.rule = rule
        self.temperature = temperature
        self.window = window
        # uncertainty: s_k = log sigma_k^2, initialised to 0 (weight 1)
        self.log_vars = nn.ParameterDict(
            {self._pkey(k): nn.Parameter(torch.zeros(())) for k in self.keys} if rule == "uncertainty" else {}
        )
        # dwa: running sums of the current window, and the mean losses of past windows (newest last)
        self._sum = dict.fromkeys(self.keys, 0.0)
        self._count = dict.fromkeys(self.keys, 0)
        self._steps_in_window = 0
        self.history: dict[str, list[float]] = {k: [] for k in self.keys}
        self._weights = dict.fromkeys(self.keys, 1.0)

    @staticmethod
    def _pkey(key: str) -> str:
        return key.replace("/", "__")  # ParameterDict keys cannot contain dots; keep them readable

    # ------------------------------------------------------------------------------------- weights
    def weights(self) -> dict[str, float]:
        """The current weight of every task (for logging)."""
        if self.rule == "uncertainty":
            return {k: math.exp(-self.log_vars[self._pkey(k)].item()) for k in self.keys}
        return dict(self._weights)

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reduce a dict of per-task losses to the scalar that is back-propagated."""
        if self.rule == "uncertainty":
            total = 0.0
            for k, loss in losses.items():
                s = self.log_vars[self._pkey(k)]
                total = total + torch.exp(-s) * loss + s
            return total
        return sum(self._weights[k] * loss for k, loss in losses.items())

    @torch.no_grad()
    def observe(self, losses: dict[str, float]) -> None:
        """Record this step's (unweighted) losses; close a DWA window every ``window`` steps."""
        for k, v in losses.items():
            self._sum[k] += float(v)
            self._count[k] += 1
        self._steps_in_window += 1
        if self._steps_in_window < self.window:
            return
        for k in self.keys:
            if self._count[k]:
                self.history[k].append(self._sum[k] / self._count[k])
            self._sum[k], self._count[k] = 0.0, 0
        self._steps_in_window = 0
        if self.rule == "dwa":
            self._weights = self._dwa_weights()

    def _dwa_weights(self) -> dict[str, float]:
        if any(len(self.history[k]) < 2 for k in self.keys):
            return dict.fromkeys(self.keys, 1.0)
        rates = {k: min(self.history[k][-1] / max(self.history[k][-2], 1e-12), MAX_RATE) for k in self.keys}
        exps = {k: math.exp(r / self.temperature) for k, r in rates.items()}
        norm = sum(exps.values())
        return {k: len(self.keys) * e / norm for k, e in exps.items()}

    # ---------------------------------------------------------------------------- resumable state
    def state(self) -> dict:
        """JSON-serialisable DWA bookkeeping (the uncertainty parameters live in the module state)."""
        return {
            "sum": self._sum,
            "count": self._count,
            "steps_in_window": self._steps_in_window,
            "history": self.history,
            "weights": self._weights,
        }

    def load_state(self, state: dict) -> None:
        self._sum = {k: float(v) for k, v in state["sum"].items()}
        self._count = {k: int(v) for k, v in state["count"].items()}
        self._steps_in_window = int(state["steps_in_window"])
        self.history = {k: [float(x) for x in v] for k, v in state["history"].items()}
        self._weights = {k: float(v) for k, v in state["weights"].items()}
