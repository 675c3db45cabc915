"""The pipeline's notebooks as data: what each one needs, what it writes, and its parameters per profile.

A notebook is a :class:`NotebookSpec`. The runner (:mod:`workbench.report.pipeline`) gives every
notebook its own artifact directory, ``<run>/artifacts/<name>/``, as the ``output_dir`` parameter.
Checkpoints flow between notebooks through :attr:`NotebookSpec.inputs`, declared here rather than
computed in code, e.g. ``{"init_checkpoint": "01_stage1_unimodal/run/checkpoint"}``: the parameter
``init_checkpoint`` receives ``<run>/artifacts/01_stage1_unimodal/run/checkpoint``. The first part of
such a path must be a notebook listed in ``depends_on``, and the rest one of that notebook's declared
``outputs`` (or empty: its whole artifact directory), so a typo fails before anything runs.

Parameters of a notebook for a profile = :data:`PROFILE_DEFAULTS` [profile] (dropped silently for a
notebook whose ``parameters`` cell does not declare them), then ``spec.parameters[profile]``, then
``output_dir`` and the ``inputs`` (both of which the notebook must declare).

Profiles: ``quick`` runs every notebook in under 15 minutes on 2 cores; ``full`` runs three seeds where
a notebook takes seeds, in under 2 hours on 2 jobs. ``minutes`` are one-thread timings measured here, used
to start the longest remaining work first.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import ConfigError

PROFILES = ("tiny", "quick", "full")

# Shared by every notebook that declares the parameter. `tiny` is for tests: seconds per notebook.
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {
        "profile": "tiny",
        "seeds": [0],
        "steps": 2,
        "preset": "tiny",
        "overrides": ["train.batch_size=8", "data.scale=0.1"],
    },
    "quick": {"profile": "quick", "seeds": [0], "steps": 150, "preset": "small", "overrides": []},
    "full": {"profile": "full", "seeds": [0, 1, 2], "steps": 1500, "preset": "small", "overrides": []},
}


@dataclass(frozen=True)
class NotebookSpec:
    """One notebook of the pipeline.

    ``path`` is relative to the notebooks directory (or absolute). ``outputs`` are paths relative to
    the notebook's ``output_dir`` that it promises to write; the runner checks them after a run, so a
    notebook that "succeeds" without its checkpoint fails there instead of confusing its downstream.
    """

    name: str
    path: str
    depends_on: tuple[str, ...] = ()
    parameters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # profile -> {param: value}
    inputs: Mapping[str, str | Sequence[str]] = field(default_factory=dict)  # param -> "<upstream>/<output>"
    outputs: tuple[str, ...] = ()
    title: str = ""  # one line for the index
    # profile -> measured minutes on one thread. Only the scheduler reads it (longest remaining work
    # first with --jobs > 1); a notebook without an estimate counts as one minute.
    minutes: Mapping[str, float] = field(default_factory=dict)

    def minutes_for(self, profile: str) -> float:
        """Expected one-thread minutes for ``profile``; a notebook without an estimate counts as one."""
        return float(self.minutes.get(profile, 1.0))

    def parameters_for(self, profile: str) -> dict[str, Any]:
        """This notebook's own parameters for ``profile`` (without the profile defaults or the wiring)."""
        return dict(self.parameters.get(profile, {}))


def _stage(
    name: str,
    path: str,
    title: str,
    minutes: Mapping[str, float],
    upstream: str | None = None,
    parameters: Mapping[str, Mapping[str, Any]] | None = None,
) -> NotebookSpec:
    return NotebookSpec(
        name=name,
        path=path,
        depends_on=(upstream,) if upstream else (),
        parameters=parameters or {},
        inputs={"init_checkpoint": f"{upstream}/run/checkpoint"} if upstream else {},
        outputs=("run/checkpoint",),
        title=title,
        minutes=minutes,
    )


# The full profile's stage 3 runs 6,000 updates (stages 1 and 2: the profile's 1,500). Accuracy is bound
# by stage 3's updates: the 7 classification tasks share them, and each sees a few epochs. From one
# full-profile stage-2 checkpoint (seed 0, `small` with the audio stem, test split): mean of 7 94.3% at
# 4,500 updates vs 92.3% at 3,000. With the overrides below (bf16), 6,000 against 4,500: val mean of 7
# +1.0 (seed 0) and +0.1 (seed 1); on seed 0's test five targets met against three (image digit 97.0,
# video digit 96.0, text digit 98.75; audio digit 94.5). 9,000 against 6,000, each pair from one stage-2
# checkpoint: val mean of 7 +0.7 (seed 3) and +0.9 (seed 4), but the profile's plan would grow from 119
# to 131 min, past the Notebooks issue's 2-hour budget; run by hand with train.steps=9000 (RESULTS.md).
FULL_STAGE3_STEPS = 6000
# One-thread minutes per 1,500 stage-3 updates of `small` with the profile's overrides, evaluation
# included: 300 updates took 137 s on one thread here (0.46 s each; the pooled stems made them cheaper
# than the 26 minutes measured per 1,500 before them).
_STAGE3_MINUTES_PER_1500 = 12
# With 3,000 updates it could already afford what the default run's 1,200 cannot: the audio warp (its
# clips are otherwise fitted to 100% against 86% on unseen voices), and three video/digit draws for one
# video/motion (video's share unchanged). From the same checkpoint: video digit 90.8% vs 73.2%, audio
# digit 84.0% vs 82.7%, motion 99.8%, mean of 7 90.9% vs 87.7%. In the default run the same two
# settings took motion from 98.4% to 58.2% (RESULTS.md). Denoise draws 1.5 as well:
# with the nine-convolution refiner, +6.00 vs +5.63 dB over its input, mean of 7 90.3% vs 90.5%.
FULL_STAGE3_OVERRIDES = [
    "model.spec_warp=0.2",
    "train.label_smoothing=0.1",  # mean of 7 +1.2 (seed 0) and +0.8 (seed 1) at 4,500 updates (RESULTS.md)
    "model.text_unk_insert=0.5",  # text digit val +3.3 (seed 0) and +3.8 (seed 1) at 4,500 updates (RECIPE.md)
    "train.task_sampling={text/digit: 4, text/language: 0.5, video/digit: 1.5, video/motion: 0.5, "
    "image/denoise: 1.5}",
]

# The evaluation notebook's unseen datasets in the full profile, relative to notebooks/ (the shared FSDD
# recordings beside the repository; Debian's dataset-fashion-mnist package; scikit-learn's UCI digits,
# which read no directory).
ADAPT_DATASETS_FULL = [
    ["fsdd", "../../shared/data/fsdd"],
    ["idx", "/usr/share/datasets/fashion-mnist"],
    ["uci-digits", ""],
]


# Table 12's rows train 1-3 stages each (the `single` rows once per column modality), so the ablations
# run at `tiny` widths with tiny's higher learning rate: `small` took 17 minutes per notebook for one
# seed of 150 steps here. Full: 3 seeds, 600 steps per stage.
_ABLATION_PARAMETERS = {
    "quick": {"preset": "tiny", "overrides": ["train.lr=1e-3"]},
    "full": {"preset": "tiny", "steps": 600, "overrides": ["train.lr=1e-3"]},
}


def _ablation(
    name: str, title: str, minutes: Mapping[str, float], upstream: tuple[str, ...] = ()
) -> NotebookSpec:
    return NotebookSpec(
        name=name,
        path=f"{name}.ipynb",
        depends_on=upstream,
        parameters=_ABLATION_PARAMETERS,
        inputs={"ablation_dirs": list(upstream)} if upstream else {},
        title=title,
        minutes=minutes,
    )


# 21_imp_moe's recipe on tiny widths: a higher learning rate than tiny's default, MoE in every block.
_IMP_TINY = ["train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=20", "model.moe_every=1"]

# Registry order is the display order and breaks ties of the dependency order.
DEFAULT_REGISTRY: tuple[NotebookSpec, ...] = (
    NotebookSpec(
        "00_data_tour",
        "00_data_tour.ipynb",
        title="Data tour: every modality, task and split",
        minutes={"quick": 0.3, "full": 0.3},
    ),
    _stage(
        "01_stage1_unimodal",
        "01_stage1_unimodal.ipynb",
        "Stage 1: unimodal masked pre-training",
        {"quick": 1.1, "full": 11.5},
    ),
    _stage(
        "02_stage2_pairwise",
        "02_stage2_pairwise.ipynb",
        "Stage 2: pairwise masked pre-training",
        {"quick": 1.3, "full": 11.5},
        upstream="01_stage1_unimodal",
    ),
    _stage(
        "03_stage3_multitask",
        "03_stage3_multitask.ipynb",
        "Stage 3: multitask training",
        {"quick": 3.2, "full": _STAGE3_MINUTES_PER_1500 * FULL_STAGE3_STEPS / 1500},
        upstream="02_stage2_pairwise",
        parameters={"full": {"steps": FULL_STAGE3_STEPS, "overrides": FULL_STAGE3_OVERRIDES}},
    ),
    NotebookSpec(
        "04_evaluation",
        "04_evaluation.ipynb",
        depends_on=("03_stage3_multitask",),
        inputs={"checkpoint": "03_stage3_multitask/run/checkpoint"},
        title="Evaluation: test metrics, errors, attention maps, adaptation to unseen datasets",
        # adaptation: FSDD (seconds a run) in every profile, Fashion-MNIST (1-2 min a run) in full
        parameters={"tiny": {"adapt_epochs": 20}, "full": {"adapt_datasets": ADAPT_DATASETS_FULL}},
        minutes={"quick": 1.3, "full": 9.5},
    ),
    # The ablation notebooks split Table 12's six rows between them and read each other's rows:
    # 10 trains rows 1 and 6, 11 trains 2 and 5, 12 trains 3 and 4 (workbench/ablation.py).
    _ablation(
        "10_ablation_pretraining",
        "Ablation: single vs multiple pre-training modalities",
        {"quick": 3.1, "full": 35},
    ),
    _ablation(
        "11_ablation_tokenizer",
        "Ablation: modality-specific vs unified tokenizer",
        {"quick": 2.9, "full": 32},
        upstream=("10_ablation_pretraining",),
    ),
    _ablation(
        "12_ablation_task_head",
        "Ablation: task-specific vs unified vs autoencoder head",
        {"quick": 2.6, "full": 30},
        upstream=("10_ablation_pretraining", "11_ablation_tokenizer"),
    ),
    NotebookSpec(
        "13_table12",
        "13_table12.ipynb",
        depends_on=("10_ablation_pretraining", "11_ablation_tokenizer", "12_ablation_task_head"),
        inputs={
            "ablation_dirs": [
                "10_ablation_pretraining",
                "11_ablation_tokenizer",
                "12_ablation_task_head",
            ]
        },
        title="Table 12 reproduction (paper beside ours)",
        minutes={"quick": 0.2, "full": 0.3},
    ),
    # The article's fusion strategies (METHOD.md section 4; workbench/fusion.py) train their own small
    # networks, so no upstream. The `tiny` preset in every profile: `small` is ~15x slower per step here.
    NotebookSpec(
        "20_fusion_strategies",
        "20_fusion_strategies.ipynb",
        parameters={
            "quick": {"steps": 150, "preset": "tiny"},
            "full": {"seeds": [0, 1, 2], "steps": 1000, "preset": "tiny"},
        },
        title="Fusion strategies: early vs late vs hybrid, with a missing modality",
        minutes={"quick": 1.1, "full": 12.5},
    ),
    # Seed systems (METHOD.md section 4). IMP trains from scratch (no upstream checkpoint).
    NotebookSpec(
        "21_imp_moe",
        "21_imp_moe.ipynb",
        parameters={
            "tiny": {"steps": 4},  # the tiny defaults (tiny widths + the IMP settings): seconds
            # tiny widths + the IMP settings with MoE in both blocks (f.0, g.0): 40 ms per dense update and
            # 65 ms per MoE update on one core, so ~3 minutes (quick) and ~35 minutes for 3 seeds x 2 variants
            # (full). `preset: imp` (small widths) is ~10x slower per update here.
            "quick": {"preset": "tiny", "steps": 150, "overrides": [*_IMP_TINY, "data.scale=0.5"]},
            "full": {"preset": "tiny", "steps": 4000, "overrides": [*_IMP_TINY]},
        },
        title="IMP: dense vs mixture-of-experts, alternating updates",
        minutes={"quick": 0.7, "full": 21.5},
    ),
    # DeepSense-v2 (workbench/deepsense.py) pre-trains its own encoders from scratch: no upstream. `tiny` widths
    # in every profile (quick: ~1.5 minutes on 2 shared cores; full: 3 seeds, ~30 minutes); tiny: 2 updates.
    NotebookSpec(
        "22_deepsense",
        "22_deepsense.ipynb",
        parameters={
            "tiny": {"steps": 2},
            "quick": {"steps": 300, "preset": "tiny"},
            "full": {"seeds": [0, 1, 2], "steps": 2000, "preset": "tiny"},
        },
        title="DeepSense-v2: modality-specific encoders, contrastive pre-training, cross-modal retrieval",
        minutes={"quick": 1.7, "full": 25},
    ),
)


def default_registry() -> tuple[NotebookSpec, ...]:
    """The registry the CLI runs (tests pass their own to :func:`~workbench.report.pipeline.run_pipeline`)."""
    return DEFAULT_REGISTRY


def closest_hint(word: str, choices: Iterable[str]) -> str:
    hit = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.4)
    return f"; did you mean {hit[0]!r}?" if hit else ""


def check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise ConfigError(
            f"unknown profile {profile!r}; choose one of {list(PROFILES)}{closest_hint(profile, PROFILES)}"
        )


def input_refs(spec: NotebookSpec) -> dict[str, list[str]]:
    """``inputs`` with every value as a list of ``<upstream>/<output>`` references."""
    return {k: [v] if isinstance(v, str) else list(v) for k, v in spec.inputs.items()}


def validate(registry: Sequence[NotebookSpec]) -> dict[str, NotebookSpec]:
    """Check names, dependencies and input wiring; return the specs by name. Raises ConfigError."""
    by_name: dict[str, NotebookSpec] = {}
    for spec in registry:
        if spec.name in by_name:
            raise ConfigError(f"notebook {spec.name!r} is registered twice")
        if not spec.name or "/" in spec.name:
            raise ConfigError(f"notebook name {spec.name!r} must be non-empty and contain no '/'")
        by_name[spec.name] = spec
    for spec in registry:
        for dep in spec.depends_on:
            if dep not in by_name:
                raise ConfigError(
                    f"{spec.name}: depends on unknown notebook {dep!r}{closest_hint(dep, by_name)}"
                )
        for profile in spec.parameters:
            if profile not in PROFILES:
                raise ConfigError(
                    f"{spec.name}: parameters for unknown profile {profile!r}{closest_hint(profile, PROFILES)}"
                )
        for profile, minutes in spec.minutes.items():
            if (
                profile not in PROFILES
                or isinstance(minutes, bool)
                or not isinstance(minutes, (int, float))
                or not minutes > 0
            ):
                raise ConfigError(
                    f"{spec.name}: minutes[{profile!r}] = {minutes!r}; need a known profile and minutes > 0"
                )
        for param, refs in input_refs(spec).items():
            for ref in refs:
                upstream, _, rest = ref.partition("/")
                if upstream not in spec.depends_on:
                    raise ConfigError(
                        f"{spec.name}: input {param}={ref!r} reads from {upstream!r}, which is not in its "
                        f"depends_on {list(spec.depends_on)}"
                    )
                outputs = by_name[upstream].outputs
                if rest and rest not in outputs:
                    raise ConfigError(
                        f"{spec.name}: input {param}={ref!r}: {upstream} declares no output {rest!r} "
                        f"(its outputs: {list(outputs)}){closest_hint(rest, outputs)}"
                    )
    topological_order(registry)  # raises on a cycle
    return by_name


def topological_order(registry: Sequence[NotebookSpec]) -> list[NotebookSpec]:
    """Dependencies first; ties keep registry order (Kahn's algorithm, stable)."""
    pending = list(registry)
    done: set[str] = set()
    order: list[NotebookSpec] = []
    while pending:
        ready = next((s for s in pending if all(d in done for d in s.depends_on)), None)
        if ready is None:
            raise ConfigError(f"the notebook dependencies form a cycle among {[s.name for s in pending]}")
        order.append(ready)
        done.add(ready.name)
        pending.remove(ready)
    return order


def with_upstream(registry: Sequence[NotebookSpec], names: Iterable[str]) -> set[str]:
    """``names`` plus everything they depend on, transitively (for ``--only``)."""
    by_name = {s.name: s for s in registry}
    wanted: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name not in by_name:
            raise ConfigError(f"--only {name!r}: no such notebook{closest_hint(name, by_name)}")
        if name not in wanted:
            wanted.add(name)
            stack.extend(by_name[name].depends_on)
    return wanted


def critical_path(order: Sequence[NotebookSpec], profile: str) -> dict[str, float]:
    """Expected minutes of the longest chain starting at each notebook (itself included).

    ``order`` is in dependency order (:func:`topological_order`). Starting the notebook with the most
    work below it first is the classic list-scheduling rule for a dependency graph: with ``--jobs 2``
    the full profile's Table 12 chain (97 min) starts at once and the long studies fill the other job
    before the short notebooks; :func:`plan` then expects 108 min, as the timed run took.
    """
    cost = {spec.name: spec.minutes_for(profile) for spec in order}
    below = dict(cost)
    for spec in reversed(order):  # dependants come first here
        for dep in spec.depends_on:
            if dep in below:
                below[dep] = max(below[dep], cost[dep] + below[spec.name])
    return below


@dataclass(frozen=True)
class Slot:
    """Where and when :func:`plan` expects a notebook to run (minutes from the start)."""

    name: str
    job: int
    start: float
    end: float


def plan(
    registry: Sequence[NotebookSpec], profile: str, jobs: int = 1, only: Iterable[str] = ()
) -> list[Slot]:
    """The run ``workbench pipeline`` would make, on the registry's measured minutes, in start order.

    The same rule as the runner: whenever a job is free, the ready notebook with the most expected work
    below it starts (with one job, dependency order). Estimates are one-thread timings; a notebook
    without one counts as a minute.
    """
    check_profile(profile)
    validate(registry)
    order = topological_order(registry)
    selected = with_upstream(registry, only) if only else {s.name for s in order}
    order = [s for s in order if s.name in selected]
    priority = critical_path(order, profile)
    free, finish, pending, slots = [0.0] * max(1, jobs), {}, list(order), []
    while pending:
        job = free.index(min(free))
        ready = [s for s in pending if all(finish.get(d, float("inf")) <= free[job] for d in s.depends_on)]
        if not ready:  # this job idles until the next running notebook ends
            free[job] = min(t for t in finish.values() if t > free[job])
            continue
        spec = ready[0] if jobs == 1 else max(ready, key=lambda s: priority[s.name])  # max: first of ties
        pending.remove(spec)
        end = free[job] + spec.minutes_for(profile)
        slots.append(Slot(spec.name, job, free[job], end))
        free[job] = finish[spec.name] = end
    return slots
