"""One training function in the Accelerate idiom; the three stages are objectives plugged into it.

    prepare once -> with accelerator.accumulate(objective) -> accelerator.backward -> sync_gradients
    gates clipping, the scheduler and step counting -> save_state / load_state + skip_first_batches
    (per stream, see streams.py) -> init_trackers / log / end_training.

The same function runs on one CPU process, on two gloo processes, or on many GPUs with DDP, FSDP or
DeepSpeed (`accelerate launch`); nothing in it names a device.

A run directory holds::

    RUN/config.yaml, RUN/config.json   the resolved config
    RUN/state/<step>/                  Accelerate state (model, optimiser, scheduler, RNG) + trainer_state.json
                                       (+ ema.safetensors: the weight average, with train.ema_decay)
    RUN/checkpoint/                    the model (config.json, model.safetensors, tokenizer.json)
    RUN/history.jsonl                  one line per logged step: losses, task weights, lr, samples/s
    RUN/metrics.json                   final evaluation
    RUN/logs/                          tracker output (TensorBoard by default)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradientAccumulationPlugin, set_seed
from tqdm.auto import tqdm

from workbench.config import Config, save_config, to_dict
from workbench.errors import ConfigError, WorkbenchError
from workbench.hardware import resolve_precision
from workbench.train.averaging import WeightAverage
from workbench.train.objectives import OBJECTIVES, Objective
from workbench.train.streams import StreamSet

STATE_FILE = "trainer_state.json"


class TrainingDiverged(WorkbenchError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------- optimiser
def warmup_cosine(warmup: int, total: int, floor: float):
    """LR multiplier: linear warm-up to 1 over ``warmup`` updates, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(
    objective: Objective, cfg: Config
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with the network's own decay groups (no decay on biases, norms, tokens, label embeddings;
    ViT/MAE habit) plus the objective's extra parameters (e.g. uncertainty weights), undecayed."""
    t = cfg.train
    groups = objective.model.optimizer_groups(t.weight_decay, layer_decay=t.layer_decay)
    own = {id(p) for g in groups for p in g["params"]}
    extra = [p for p in objective.parameters() if p.requires_grad and id(p) not in own]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    for group in groups:  # LambdaLR scales each group's own initial rate; the first group is the top's
        group["lr"] = t.lr * group.get("lr_scale", 1.0)
    # fused: one kernel for every tensor (CPU and CUDA); the per-tensor default was 4-5x slower per update
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(t.warmup_steps, t.steps, t.min_lr_ratio)
    )
    return optimizer, scheduler


# --------------------------------------------------------------------------------------- states
def _states(run_dir: Path) -> list[Path]:
    root = run_dir / "state"
    done = [p for p in root.glob("*") if p.is_dir() and p.name.isdigit() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name))


def latest_state(run_dir: Path) -> Path | None:
    states = _states(run_dir)
    return states[-1] if states else None


def _save_state(
    accelerator: Accelerator,
    run_dir: Path,
    step: int,
    trainer_state: dict,
    keep: int,
    ema: WeightAverage | None = None,
) -> None:
    """Write ``state/<step>`` atomically: into a temporary directory, then one rename.

    A kill during the save leaves a ``tmp-`` directory behind, never a broken numbered state, so
    ``--resume`` always finds the last complete one.
    """
    final = run_dir / "state" / str(step)
    tmp = run_dir / "state" / f"tmp-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        if ema is not None:  # every rank holds the same average (same updates): the main one writes it
            ema.save(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state))  # last: it marks the state complete
        if final.exists():  # the same step saved again (a resumed run): move the old one aside first,
            old = run_dir / "state" / f"old-{step}"  # so no moment leaves a half-deleted numbered state
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        for stale in _states(run_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _split_metrics(model, bench, cfg: Config, split: str, accelerator: Accelerator) -> dict:
    """A stage's metrics on ``split``: stage 3's task metrics, stage 1/2's masked-prediction loss per
    modality."""
    from workbench.evaluate import evaluate, evaluate_masked

    if cfg.train.stage == 3:
        return evaluate(model, bench, split, accelerator=accelerator)
    return evaluate_masked(model, bench, split, cfg, accelerator=accelerator)


def _validate(model, bench, cfg: Config, accelerator: Accelerator) -> dict:
    """The end-of-run validation metrics, mid-run (``train.eval_every``), with the model back in
    training mode after.

    The global RNG states are restored afterwards, so a run with mid-run validation trains exactly as
    one without (a DataLoader draws its base seed from the global generator on every ``iter``)."""
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        model.eval()
        try:
            return _split_metrics(model, bench, cfg, "val", accelerator)
        finally:
            model.train()
            random.setstate(py_state)
            np.random.set_state(np_state)


def _write_process_record(
    run_dir: Path, accelerator: Accelerator, model: torch.nn.Module, steps: int, samples: int
):
    """``RUN/processes/<rank>.json``: what each process did, and a digest of its weights.

    Under data parallelism every rank must end with identical weights; the digest makes that checkable.
    """
    digest = hashlib.sha256()
    for p in model.state_dict().values():
        digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    record = {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "steps": steps,
              "samples": samples, "weights_sha256": digest.hexdigest()}  # fmt: skip
    (run_dir / "processes").mkdir(parents=True, exist_ok=True)
    (run_dir / "processes" / f"{accelerator.process_index}.json").write_text(json.dumps(record) + "\n")


# What a later stage takes from an earlier stage's checkpoint (METHOD.md section 2: decoders are
# discarded after pre-training; stage 2 adds A and g; a stage-3 checkpoint also has trained heads).
INHERITED = {
    1: ("tokenizers", "f"),
    2: ("tokenizers", "f", "A", "g"),
    3: ("tokenizers", "f", "A", "g", "heads"),
}


def _initialise(model: torch.nn.Module, init: Path, cfg: Config) -> dict[str, int]:
    """Load the components an ``--init`` checkpoint of stage s hands on; return tensors loaded per component.

    ``task_head=autoencoder`` (Table 12 rows 1-2) starts each task head from its modality's stage-1
    decoder, the "autoencoder" the paper fine-tunes.
    """
    from workbench.config import read_saved_config

    init_stage = int(read_saved_config(init / "config.json").get("train", {}).get("stage", 3))
    prefixes = INHERITED[init_stage]
    autoencoder = cfg.model.task_head == "autoencoder" and cfg.train.stage == 3 and init_stage == 1
    if autoencoder:
        prefixes = (*prefixes, "decoders1")
    names = model.load_components(init, prefixes)
    if autoencoder:
        model.init_heads_from_decoders()
    counts: dict[str, int] = {}
    for name in names:
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + 1
    return counts


# ------------------------------------------------------------------------------------------ train
def train(
    cfg: Config,
    out: str | Path,
    *,
    init: str | Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> TrainResult | None:
    """Train stage ``cfg.train.stage`` into the run directory ``out``; return where the checkpoint is.

    ``stop_after=k`` ends the work right after update k and its state save, as an interruption
    would (no checkpoint, no evaluation; returns None): tests resume from there.
    """
    from workbench.data import load_benchmark, make_loader
    from workbench.model import build_model
    from workbench.model.text_tokenizer import TextTokenizer

    run_dir = Path(out)
    # the saved config records the precision that actually ran (``auto`` depends on the hardware)
    cfg = replace(cfg, train=replace(cfg.train, mixed_precision=resolve_precision(cfg.train.mixed_precision)))
    t = cfg.train
    # One process (a notebook kernel, a test) may train several stages with different settings: start
    # each from a fresh AcceleratorState. PartialState (the process group of a launched job) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=t.grad_accum, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,  # we step it once per optimiser update ourselves
        # stage 3 touches two of the heads each step; the others legitimately get no gradient
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=None if t.tracker == "none" else t.tracker,
        project_dir=str(run_dir / "logs"),
    )
    set_seed(cfg.seed)
    state_dir = latest_state(run_dir) if resume else None
    if resume and state_dir is None:
        raise WorkbenchError(
            f"--resume: no saved state under {run_dir / 'state'}; start the run without --resume"
        )
    if accelerator.is_main_process:
        save_config(cfg, run_dir)
    accelerator.wait_for_everyone()

    bench = load_benchmark(cfg.data, seed=cfg.seed)
    tokenizer = None
    if init is not None and (Path(init) / "tokenizer.json").is_file():
        tokenizer = TextTokenizer.load(init, cfg.model.max_text_tokens)
    elif any(task.modality == "text" for task in bench.tasks):
        # Trained once on the main process and shared through the run directory, so every rank uses
        # exactly the same vocabulary.
        shared = run_dir / "text_tokenizer"
        if accelerator.is_main_process and not (shared / "tokenizer.json").is_file():
            shared.mkdir(parents=True, exist_ok=True)
            corpus = bench.text_corpus("train")
            TextTokenizer.for_model(corpus, cfg.model).save(shared)
        accelerator.wait_for_everyone()
        tokenizer = TextTokenizer.load(shared, cfg.model.max_text_tokens)
    model = build_model(cfg, bench.tasks)
    model.text_tokenizer = tokenizer
    loaded: dict[str, int] = {}
    if init is not None:
        loaded = _initialise(model, Path(init), cfg)
    objective: Objective = OBJECTIVES[t.stage](model, cfg, bench.tasks)
    objective.rank = accelerator.process_index
    optimizer, scheduler = build_optimizer(objective, cfg)
    objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    inner: Objective = accelerator.unwrap_model(objective)
    ema = None
    if t.ema_decay > 0:
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError(
                "train.ema_decay averages whole weights, which FSDP and DeepSpeed shard across processes; "
                "set train.ema_decay=0 or train with DDP"
            )
        ema = WeightAverage(inner.model, t.ema_decay)
    judged = inner.model if ema is None else ema.module  # what the run validates, evaluates and saves

    def make_stream_loader(key: str):
        modality, task = key.split("/", 1)
        return make_loader(
            bench.dataset(modality, task, "train"),
            inner.stream_batch_size(key),
            shuffle=True,
            seed=cfg.seed,
            text_tokenizer=tokenizer,
            drop_last=True,
            num_workers=cfg.data.num_workers,
        )

    streams = StreamSet(accelerator, make_stream_loader)
    step = 0
    if state_dir is not None:
        try:
            accelerator.load_state(str(state_dir))
        except Exception as err:  # a damaged or tampered state (pickles refused by weights_only, bad files)
            detail = (
                re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split(". ")[0].splitlines()[0] if str(err) else ""
            )
            raise WorkbenchError(
                f"--resume: the saved state {state_dir} cannot be loaded ({type(err).__name__}: {detail}); "
                "delete it to resume from an earlier one"
            ) from None
        saved = json.loads((state_dir / STATE_FILE).read_text())
        step = saved["step"]
        streams.load_state(saved["streams"])
        inner.load_state(saved["objective"])
        if ema is not None:
            if not WeightAverage.saved_in(state_dir):
                raise WorkbenchError(
                    f"--resume: the saved state {state_dir} holds no weight average (train.ema_decay was 0 "
                    "when it was saved); resume with train.ema_decay=0 or start the run again"
                )
            ema.load(state_dir)
    if t.tracker != "none":
        accelerator.init_trackers("workbench", config=_flat(to_dict(cfg)))

    history = run_dir / "history.jsonl"
    if accelerator.is_main_process:
        # a resumed run replays the steps after its state: drop their old records (and all on a new run)
        kept = [] if not resume or not history.is_file() else [
            line for line in history.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]  # fmt: skip
        history.write_text("".join(line + "\n" for line in kept))

    def publish(record: dict) -> None:  # to the trackers and, once, to history.jsonl
        accelerator.log(record, step=record["step"])
        if accelerator.is_main_process:
            with history.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    progress = tqdm(
        total=t.steps, initial=step, disable=not accelerator.is_local_main_process, desc=f"stage {t.stage}"
    )
    window: dict[str, list[float]] = {}
    norms: list[float] = []  # gradient norms (before clipping) of the updates since the last record
    samples, tic, started = 0, time.perf_counter(), time.perf_counter()
    eval_seconds = 0.0  # spent in mid-run validation: not training time, nor in samples/s
    local_samples = 0
    micro = 0
    while step < t.steps:
        batches = [streams.next(key) for key in inner.plan(step, micro)]
        with accelerator.accumulate(objective):
            loss, parts = objective(batches, step, micro)
            if not torch.isfinite(loss.detach()):
                progress.close()  # so the message is not glued to the bar's last frame
                raise TrainingDiverged(
                    f"non-finite loss ({loss.item()}) at step {step} of stage {t.stage} on "
                    f"{', '.join(b.key for b in batches)}; the last good state is kept in {run_dir / 'state'}"
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.clip_grad > 0:
                # the norm before clipping: logged, so a run whose every update is clipped shows it
                norm = accelerator.clip_grad_norm_(objective.parameters(), t.clip_grad)
                if norm is not None:  # DeepSpeed clips inside its engine and returns None
                    norms.append(float(norm))
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
                if ema is not None:
                    ema.update(inner.model)
            optimizer.zero_grad(set_to_none=True)
        samples += sum(len(b) for b in batches) * accelerator.num_processes
        local_samples += sum(len(b) for b in batches)
        for k, v in parts.items():
            window.setdefault(k, []).append(float(v))
        micro += 1
        if not accelerator.sync_gradients:
            continue
        micro = 0
        inner.observe({k: float(v) for k, v in parts.items()})
        step += 1
        progress.update(1)
        if step % t.log_every == 0 or step == t.steps:
            elapsed = time.perf_counter() - tic
            record = {
                "step": step,
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": samples / max(elapsed, 1e-9),
            }
            record |= {f"loss/{k}": sum(v) / len(v) for k, v in window.items()}
            if norms:
                record["grad_norm"] = sum(norms) / len(norms)
                record["clipped"] = sum(n > t.clip_grad for n in norms) / len(norms)
            if hasattr(inner, "balancer"):
                record |= {f"weight/{k}": w for k, w in inner.balancer.weights().items()}
            publish(record)
            progress.set_postfix(loss=f"{sum(sum(v) / len(v) for v in window.values()):.3f}",
                                 sps=f"{record['samples_per_s']:.0f}")  # fmt: skip
            window, norms, samples, tic = {}, [], 0, time.perf_counter()
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:  # the last step's comes below
            t0 = time.perf_counter()
            val = _validate(judged, bench, cfg, accelerator)
            record = {"step": step} | {
                f"val/{key}/{name}": value
                for key, row in val.items()
                for name, value in row.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            }  # e.g. val/image/digit/accuracy, val/image/denoise/psnr, val/audio/masked_loss
            publish(record)
            spent = time.perf_counter() - t0
            eval_seconds += spent
            tic += spent
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or step in (t.steps, stop_after):
            state = {"step": step, "streams": streams.state(), "objective": inner.state()}
            _save_state(accelerator, run_dir, step, state, t.keep_checkpoints, ema)
        if stop_after is not None and step >= stop_after:
            progress.close()
            accelerator.end_training()
            return None
    progress.close()

    seconds = time.perf_counter() - started - eval_seconds
    _write_process_record(run_dir, accelerator, inner.model, step, local_samples)
    model = judged
    model.eval()
    splits = ("val", "test") if t.stage == 3 else ("val",)
    metrics = {split: _split_metrics(model, bench, cfg, split, accelerator) for split in splits}
    metrics |= {"stage": t.stage, "steps": step, "train_seconds": seconds, "initialised_from": str(init or ""),
                "loaded_components": loaded}  # fmt: skip
    checkpoint = run_dir / "checkpoint"
    if accelerator.is_main_process:
        model.save_pretrained(checkpoint, cfg, tokenizer)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(run_dir, checkpoint, step, metrics, seconds)
