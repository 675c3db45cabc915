"""The three OmniVec2 stages as objectives plugged into one training loop (METHOD.md section 2).

An objective is an ``nn.Module`` wrapping the network so that Accelerate/DDP sees every step go
through ``forward`` (gradient synchronisation hooks live there). Each step it

1. ``plan(step)``: names the streams (``"modality/task"``) to draw a batch from. The plan is a pure
   function of ``(seed, step)``, so every process picks the same modalities (DDP needs the same graph
   on every rank) and a resumed run replays the same choices;
2. ``forward(batches, step)``: returns the scalar to back-propagate and a dict of named, detached
   loss parts for logging (losses stay a dict until the balancer reduces them, STYLE.md rule 7).

Stage 3 has two schedules (``train.schedule``): OmniVec2's ``pairs`` (:class:`MultitaskSupervised`)
and IMP's ``alternating`` gradient descent (:class:`AlternatingSupervised`). With mixture-of-experts
layers (``model.moe_experts > 0``) every objective adds the routers' load-balancing loss, weighted by
``model.moe_aux_weight`` and logged as ``moe_aux``; dense models are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from workbench.batch import Batch
from workbench.config import Config
from workbench.errors import ConfigError
from workbench.modalities import TaskSpec, default_tasks
from workbench.model.moe import collect_aux
from workbench.train.balance import TaskBalancer
from workbench.train.resolution import vary_resolution


def _average(items: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Name -> loss, averaging names that occur twice (both streams of one modality or task)."""
    grouped: dict[str, list[torch.Tensor]] = {}
    for name, loss in items:
        grouped.setdefault(name, []).append(loss)
    return {name: sum(losses) / len(losses) for name, losses in grouped.items()}


class Objective(nn.Module):
    stage: int = 0

    def __init__(self, model: nn.Module, cfg: Config, tasks: Sequence[TaskSpec]):
        super().__init__()
        self.model = model
        self.seed = cfg.seed
        self.rank = 0  # set by the loop; varies the masking noise between data-parallel processes
        self.tasks = list(tasks)
        self.modalities = list(dict.fromkeys(t.modality for t in self.tasks))
        self.batch_size = cfg.train.batch_size
        self.batch_scale = dict(cfg.train.batch_scale or {})
        self.grad_accum = cfg.train.grad_accum
        self.moe_aux_weight = cfg.model.moe_aux_weight if cfg.model.moe_experts else None

    def _with_moe_aux(
        self, loss: torch.Tensor, parts: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Add this forward's MoE load-balancing loss (part ``moe_aux``); unchanged for dense models."""
        if self.moe_aux_weight is None:
            return loss, parts
        aux = collect_aux(self.model)
        return loss + self.moe_aux_weight * aux, {**parts, "moe_aux": aux.detach()}

    def _rng(self, step: int, micro: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stage, step, micro])

    def _generator(self, step: int, micro: int = 0) -> torch.Generator:
        """Training noise (masks, text offsets) for this step and process: reproducible, and independent
        of data order, so a resumed run replays it."""
        g = torch.Generator()
        g.manual_seed(int(self._rng(step, micro).integers(2**62)) + self.rank)
        return g

    def _pair(self, rng: np.random.Generator) -> list[str]:
        """Two different modalities drawn at random (the same one twice if only one is configured)."""
        if len(self.modalities) == 1:
            return self.modalities * 2
        i, j = rng.choice(len(self.modalities), size=2, replace=False)
        return [self.modalities[i], self.modalities[j]]

    def reconstruction_stream(self, modality: str) -> str:
        """Masked pre-training reads a modality's clean inputs: those of its first task (e.g. image/digit)."""
        first = next(t for t in self.tasks if t.modality == modality and t.kind == "classification")
        return first.key

    def base_batch_size(self) -> int:
        """Samples per stream batch before ``train.batch_scale``: the whole batch, or half of it for
        objectives that run two streams per update."""
        return self.batch_size

    def stream_batch_size(self, key: str) -> int:
        """Samples per batch of stream ``key`` (``"modality/task"``): the base size times
        ``train.batch_scale`` of the key's modality (1 if unlisted)."""
        return max(1, round(self.base_batch_size() * self.batch_scale.get(key.split("/", 1)[0], 1.0)))

    def plan(self, step: int, micro: int = 0) -> list[str]:
        raise NotImplementedError

    def forward(
        self, batches: list[Batch], step: int, micro: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def observe(self, parts: dict[str, float]) -> None:
        """Called once per optimiser update with the (process-local) loss parts."""

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


class _Masked(Objective):
    """Set-up shared by the masked pre-training stages: per-modality mask ratios and the weight of
    the kept text tokens in the masked-LM loss."""

    def __init__(self, model: nn.Module, cfg: Config, tasks: Sequence[TaskSpec]):
        super().__init__(model, cfg, tasks)
        self.mask_ratio = dict(cfg.train.mask_ratio)
        self.visible_weight = cfg.train.mlm_visible_weight


class UnimodalMasked(_Masked):
    """Stage 1: MAE-style masked prediction, one modality per step, all through ONE shared f.

    Modalities take turns (step mod M) so each sees the same number of updates.
    """

    stage = 1

    def plan(self, step: int, micro: int = 0) -> list[str]:
        m = self.modalities[(step * self.grad_accum + micro) % len(self.modalities)]
        return [self.reconstruction_stream(m)]

    def forward(self, batches: list[Batch], step: int, micro: int = 0):
        (batch,) = batches
        out = self.model.forward_masked(
            batch,
            self.mask_ratio[batch.modality],
            generator=self._generator(step, micro),
            visible_weight=self.visible_weight,
        )
        return self._with_moe_aux(out.loss, {f"{batch.modality}/masked": out.loss.detach()})


class PairwiseMasked(_Masked):
    """Stage 2: two modalities at random, both masked, through f, A, g, A-back and per-modality decoders.

    Unpaired by default (the two batches show unrelated samples), no task balancing.
    """

    stage = 2

    def base_batch_size(self) -> int:
        return max(1, self.batch_size // 2)

    def plan(self, step: int, micro: int = 0) -> list[str]:
        return [self.reconstruction_stream(m) for m in self._pair(self._rng(step, micro))]

    def forward(self, batches: list[Batch], step: int, micro: int = 0):
        a, b = batches
        g = self._generator(step, micro)
        n = min(len(a), len(b))  # fusion pairs rows; a larger stream's extra rows run unimodal
        out_a, out_b = self.model.forward_masked_pair(
            a.slice(0, n),
            b.slice(0, n),
            self.mask_ratio[a.modality],
            self.mask_ratio[b.modality],
            generator=g,
            visible_weight=self.visible_weight,
        )
        loss_a, loss_b = (self._with_rest(out.loss, x, n, g) for out, x in ((out_a, a), (out_b, b)))
        parts = _average([(f"{a.modality}/masked", loss_a), (f"{b.modality}/masked", loss_b)])
        return self._with_moe_aux(loss_a + loss_b, {k: v.detach() for k, v in parts.items()})

    def _with_rest(self, loss: torch.Tensor, batch: Batch, n: int, g: torch.Generator) -> torch.Tensor:
        """The stream's loss over all its rows: rows past the first ``n`` (a ``train.batch_scale``d
        stream) through the unimodal masked forward (stage 1's decoder, which stage 2 trains from where
        its checkpoint left it), the two means weighted by their rows."""
        if len(batch) == n:
            return loss
        rest = batch.slice(n, len(batch))
        extra = self.model.forward_masked(
            rest, self.mask_ratio[batch.modality], generator=g, visible_weight=self.visible_weight
        ).loss
        return (n * loss + len(rest) * extra) / len(batch)


def task_sampling(weights: dict[str, float], keys: Sequence[str]) -> dict[str, float] | None:
    """``train.task_sampling`` checked against the run's tasks: a weight for every key, or None when
    every task weighs the same (uniform sampling). A key naming a benchmark task this run does not train
    (text/digit in an image-only run) is ignored, so one config serves any ``data.modalities``; a key
    naming no task at all is a typo and refused."""
    known = set(keys) | {t.key for t in default_tasks()}
    unknown = sorted(set(weights) - known)
    if unknown:
        raise ConfigError(
            f"train.task_sampling names {unknown}, which is no task; this run trains {list(keys)}"
        )
    out = {k: float(weights.get(k, 1.0)) for k in keys}
    if len(set(out.values())) == 1:
        return None
    by_modality: dict[str, float] = {}
    for k, w in out.items():
        by_modality[k.split("/")[0]] = by_modality.get(k.split("/")[0], 0.0) + w
    if sum(1 for w in by_modality.values() if w > 0) < min(2, len(by_modality)):
        raise ConfigError("train.task_sampling gives weight to fewer than two modalities; a pair needs two")
    return out


class MultitaskSupervised(Objective):
    """Stage 3: a random modality pair, one random task each (drawn by ``train.task_sampling``), half
    the batch from each; the sum of the two task losses, each scaled by the task balancer (DWA by
    default).

    The two-stream forward feeds each head ``A(x_hat_ij, x_i)``, but inference is single-stream
    (``h(g(f(x)))``, METHOD.md section 1), a path pure pair updates never train. With
    ``train.single_stream = p`` a share p of the updates (drawn per update from the seed, so resumes
    replay them) runs both batches through the single-stream forward instead, same tasks and losses.
    """

    stage = 3

    def __init__(self, model: nn.Module, cfg: Config, tasks: Sequence[TaskSpec]):
        super().__init__(model, cfg, tasks)
        t = cfg.train
        self.balancer = TaskBalancer(
            [s.key for s in self.tasks], t.balancer, t.dwa_temperature, t.balance_window
        )
        self.single_stream_share = t.single_stream
        self.label_smoothing = t.label_smoothing
        self.mixup = dict(t.mixup)
        self.kinds = {s.key: s.kind for s in self.tasks}
        self.by_modality = {m: [s.key for s in self.tasks if s.modality == m] for m in self.modalities}
        self.sampling = task_sampling(t.task_sampling, [s.key for s in self.tasks])
        if self.sampling is not None:  # draw probabilities, fixed for the run
            mod_w = np.array([sum(self.sampling[k] for k in self.by_modality[m]) for m in self.modalities])
            self.modality_p = mod_w / mod_w.sum()
            self.task_p = {}
            for m, keys in self.by_modality.items():
                w = np.array([self.sampling[k] for k in keys])
                self.task_p[m] = w / w.sum() if w.sum() > 0 else None

    def base_batch_size(self) -> int:
        return max(1, self.batch_size // 2)

    def plan(self, step: int, micro: int = 0) -> list[str]:
        rng = self._rng(step, micro)
        if self.sampling is None:  # uniform: the draws every run made before weights existed
            return [(o := self.by_modality[m])[int(rng.integers(len(o)))] for m in self._pair(rng)]
        if len(self.modalities) == 1:
            pair = self.modalities * 2
        else:
            chosen = rng.choice(len(self.modalities), size=2, replace=False, p=self.modality_p)
            pair = [self.modalities[i] for i in chosen]
        return [self.by_modality[m][int(rng.choice(len(self.task_p[m]), p=self.task_p[m]))] for m in pair]

    def single_stream(self, step: int, micro: int = 0) -> bool:
        """Whether this update runs the single-stream forward (a pure function of seed, step, micro)."""
        p = self.single_stream_share
        if p <= 0:
            return False  # no draw: pair-only runs stay exactly as before the option existed
        return bool(np.random.default_rng([self.seed, self.stage, step, micro, 2]).random() < p)

    def mix(
        self, batch: Batch, step: int, micro: int = 0, slot: int = 0
    ) -> tuple[Batch, torch.Tensor | None, float]:
        """Mixup (Zhang et al. 2018) of a classification batch whose modality ``train.mixup`` lists:
        ``(lam * x + (1 - lam) * x[perm], perm, lam)`` with lam ~ Beta(alpha, alpha) for the batch; a
        variable-length row keeps the longer of its two lengths (padding is zeros). Other batches come
        back unchanged with ``(None, 1.0)``. The draws are a pure function of (seed, step, micro, slot),
        so a resumed run replays them."""
        alpha = self.mixup.get(batch.modality, 0.0)
        if alpha <= 0 or self.kinds[batch.key] != "classification" or len(batch) < 2:
            return batch, None, 1.0
        rng = np.random.default_rng([self.seed, self.stage, step, micro, 3, slot])
        lam = float(rng.beta(alpha, alpha))
        perm = torch.from_numpy(rng.permutation(len(batch))).to(batch.x.device)
        x = lam * batch.x + (1.0 - lam) * batch.x[perm]
        lengths = None if batch.lengths is None else torch.maximum(batch.lengths, batch.lengths[perm])
        return replace(batch, x=x, lengths=lengths), perm, lam

    def loss(self, batch: Batch, pred: torch.Tensor, perm: torch.Tensor | None = None, lam: float = 1.0):
        """The task loss of ``batch``; after :meth:`mix`, the same mix of its two targets' losses."""
        loss = self.model.task_loss(batch.key, pred, batch.y, self.label_smoothing)
        if perm is None:
            return loss
        return lam * loss + (1.0 - lam) * self.model.task_loss(
            batch.key, pred, batch.y[perm], self.label_smoothing
        )

    def forward(self, batches: list[Batch], step: int, micro: int = 0):
        (a, perm_a, lam_a), (b, perm_b, lam_b) = (self.mix(x, step, micro, i) for i, x in enumerate(batches))
        g = self._generator(step, micro)  # training-time text noise: replayed on resume
        if self.single_stream(step, micro):
            pred_a = self.model.forward_single(a, tasks=[a.task], generator=g)[a.task]
            pred_b = self.model.forward_single(b, tasks=[b.task], generator=g)[b.task]
        else:
            n = min(len(a), len(b))  # fusion pairs rows; a larger stream's extra rows run single-stream
            pred_a, pred_b = self.model.forward_pair(a.slice(0, n), b.slice(0, n), generator=g)
            pred_a, pred_b = (self._with_rest(p, x, n, g) for p, x in ((pred_a, a), (pred_b, b)))
        losses = _average(
            [
                (x.key, self.loss(x, p, perm, lam))
                for x, p, perm, lam in ((a, pred_a, perm_a, lam_a), (b, pred_b, perm_b, lam_b))
            ]
        )
        return self._with_moe_aux(self.balancer(losses), {k: v.detach() for k, v in losses.items()})

    def _with_rest(self, pred: torch.Tensor, batch: Batch, n: int, g: torch.Generator) -> torch.Tensor:
        """Predictions for all rows of a pair update's stream: rows past the first ``n`` (a
        ``train.batch_scale``d stream) through the single-stream forward."""
        if len(batch) == n:
            return pred
        rest = batch.slice(n, len(batch))
        return torch.cat([pred, self.model.forward_single(rest, tasks=[batch.task], generator=g)[batch.task]])

    def observe(self, parts: dict[str, float]) -> None:
        self.balancer.observe({k: v for k, v in parts.items() if k in self.balancer.keys})  # tasks only

    def state(self) -> dict:
        return {"balancer": self.balancer.state()}

    def load_state(self, state: dict) -> None:
        self.balancer.load_state(state["balancer"])


class AlternatingSupervised(MultitaskSupervised):
    """Stage 3 with IMP's alternating gradient descent (Akbari et al. 2023): each update draws ONE
    (modality, task) stream (a modality at random, then one of its tasks), gives it the whole batch,
    runs the single-stream forward ``h(g(f(x)))`` (no fusion) and minimises that task's loss alone,
    scaled by the task balancer. With ``train.vary_resolution`` the input resolution of classification
    batches is drawn per update too (image grid, video frames, audio length; see resolution.py).

    Plan and resolution are pure functions of ``(seed, step, micro)``, so a resumed run replays them.
    """

    def __init__(self, model: nn.Module, cfg: Config, tasks: Sequence[TaskSpec]):
        super().__init__(model, cfg, tasks)
        self.vary = cfg.train.vary_resolution
        self.model_cfg = cfg.model

    def base_batch_size(self) -> int:
        return self.batch_size

    def plan(self, step: int, micro: int = 0) -> list[str]:
        rng = self._rng(step, micro)
        if self.sampling is not None:  # a modality by its tasks' summed weight, then a task: one draw
            w = np.array(list(self.sampling.values()))
            return [list(self.sampling)[int(rng.choice(len(w), p=w / w.sum()))]]
        m = self.modalities[int(rng.integers(len(self.modalities)))]
        options = [t.key for t in self.tasks if t.modality == m]
        return [options[int(rng.integers(len(options)))]]

    def at_resolution(self, batch: Batch, step: int, micro: int = 0) -> tuple[Batch, object]:
        """The batch this update trains on, and the resolution drawn (None: the input is unchanged)."""
        if not self.vary or self.kinds[batch.key] != "classification":
            return batch, None
        rng = np.random.default_rng([self.seed, self.stage, step, micro, 1])  # apart from the plan's draws
        return vary_resolution(batch, self.model_cfg, rng)

    def forward(self, batches: list[Batch], step: int, micro: int = 0):
        (batch,) = batches
        batch, _ = self.at_resolution(batch, step, micro)
        batch, perm, lam = self.mix(batch, step, micro)
        g = self._generator(step, micro)  # training-time text noise: replayed on resume
        pred = self.model.forward_single(batch, tasks=[batch.task], generator=g)[batch.task]
        losses = {batch.key: self.loss(batch, pred, perm, lam)}
        return self._with_moe_aux(self.balancer(losses), {k: v.detach() for k, v in losses.items()})


def stage3(model: nn.Module, cfg: Config, tasks: Sequence[TaskSpec]) -> Objective:
    """Stage 3 with the configured schedule: OmniVec2 ``pairs`` or IMP ``alternating`` updates."""
    cls = AlternatingSupervised if cfg.train.schedule == "alternating" else MultitaskSupervised
    return cls(model, cfg, tasks)


# stage -> objective (a class, or for stage 3 a function choosing the schedule's class)
OBJECTIVES: dict[int, Callable[[nn.Module, Config, Sequence[TaskSpec]], Objective]] = {
    1: UnimodalMasked,
    2: PairwiseMasked,
    3: stage3,
}
