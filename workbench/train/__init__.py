"""Training: one Accelerate loop (``loop.train``) and the stage objectives plugged into it."""

from __future__ import annotations

import time
from pathlib import Path

from workbench.config import Config, load_config, read_saved_config
from workbench.errors import CheckpointError, ConfigError
from workbench.paths import runs_dir
from workbench.train.loop import TrainingDiverged, TrainResult, latest_state, train

__all__ = ["TrainResult", "TrainingDiverged", "latest_state", "resolve_run", "train"]


def resolve_run(
    stage: int,
    files: list[str] | tuple = (),
    overrides: list[str] | tuple = (),
    init: str | None = None,
    out: str | None = None,
    resume: bool = False,
) -> tuple[Config, Path]:
    """The config and run directory of a ``workbench train`` call, validated before any work.

    ``--resume`` reuses the run's saved config (overrides may still change e.g. ``train.steps``);
    ``--init CKPT`` starts from the checkpoint's config (model, data, seed) so the network and its tasks
    match it, but not from its ``train`` section: steps, learning rate, mask ratios... are each stage's
    own (defaults unless given). Then files and ``key=value`` overrides apply, and ``train.stage`` is
    set from ``--stage``.
    """
    base: dict = {}
    if resume:
        if not out:
            raise ConfigError("--resume needs --out RUN (the run directory to continue)")
        saved = Path(out) / "config.json"
        if not saved.is_file():
            raise ConfigError(f"--resume: {saved} does not exist; is {out!r} a run directory?")
        base = read_saved_config(saved)
    elif init:
        saved = Path(init) / "config.json"
        if not saved.is_file():
            raise CheckpointError(
                f"--init {init!r}: no config.json there; pass a checkpoint directory (RUN/checkpoint)"
            )
        # the network and its tasks come from the checkpoint; how this stage trains does not
        base = {k: v for k, v in read_saved_config(saved).items() if k != "train"}
    base.setdefault("train", {})["stage"] = stage
    cfg = load_config(files=files, overrides=overrides, base=base)
    if cfg.train.stage != stage:
        raise ConfigError(f"train.stage={cfg.train.stage} contradicts --stage {stage}")
    run = Path(out or cfg.train.out or runs_dir() / f"stage{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not resume and (run / "state").is_dir() and any((run / "state").iterdir()):
        raise ConfigError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    return cfg, run
