"""Pieces of the training loop that stand alone: LR schedule, task balancing, resumable streams."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader, TensorDataset

from workbench.data.loaders import EpochShuffle
from workbench.train.balance import MAX_RATE, TaskBalancer
from workbench.train.loop import warmup_cosine
from workbench.train.streams import BatchStream, StreamSet


def test_warmup_then_cosine_to_floor():
    f = warmup_cosine(warmup=10, total=110, floor=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # monotone decay after warm-up
    assert values[-1] == pytest.approx(0.1) and f(60) == pytest.approx(0.1 + 0.9 * 0.5)


def test_dwa_upweights_the_task_that_converges_slowest():
    bal = TaskBalancer(["a", "b"], "dwa", temperature=2.0, window=2)
    assert bal.weights() == {"a": 1.0, "b": 1.0}
    # window 1: a=1.0 b=1.0 ; window 2: a=0.5 (fast) b=0.9 (slow)
    for losses in ({"a": 1.0, "b": 1.0},) * 2 + ({"a": 0.5, "b": 0.9},) * 2:
        bal.observe(losses)
    w = bal.weights()
    assert w["b"] > 1.0 > w["a"] and sum(w.values()) == pytest.approx(2.0)
    ea, eb = math.exp(0.5 / 2), math.exp(0.9 / 2)
    assert w["b"] == pytest.approx(2 * eb / (ea + eb))
    total = bal({"a": torch.tensor(2.0), "b": torch.tensor(3.0)})
    assert total.item() == pytest.approx(2.0 * w["a"] + 3.0 * w["b"])


def test_dwa_a_solved_task_s_noise_does_not_silence_the_others():
    """A near-zero loss that jumps 80x in one window (noise on a solved task) must not take all the
    weight: uncapped, DWA gave the unsolved task a weight of exactly 0 (seen in a real run)."""
    bal = TaskBalancer(["solved", "hard"], "dwa", temperature=2.0, window=1)
    for losses in ({"solved": 0.0005, "hard": 2.07}, {"solved": 0.04, "hard": 2.06}):
        bal.observe(losses)
    w = bal.weights()
    assert w["solved"] > w["hard"]  # the jump still counts as slow convergence ...
    assert w["solved"] / w["hard"] == pytest.approx(math.exp((MAX_RATE - 2.06 / 2.07) / 2.0))
    assert w["hard"] > 0.5  # ... but no more than a doubled loss does


def test_dwa_state_round_trip():
    bal = TaskBalancer(["a", "b"], "dwa", window=1)
    for x in (1.0, 0.8, 0.7):
        bal.observe({"a": x, "b": 2 * x})
    other = TaskBalancer(["a", "b"], "dwa", window=1)
    other.load_state(bal.state())
    assert other.weights() == bal.weights() and other.history == bal.history


def test_uncertainty_weights_are_learned():
    bal = TaskBalancer(["a", "b"], "uncertainty")
    opt = torch.optim.SGD(bal.parameters(), lr=0.1)
    for _ in range(50):  # a constant large loss on "a": its sigma grows, its weight falls
        opt.zero_grad()
        bal({"a": torch.tensor(4.0), "b": torch.tensor(0.25)}).backward()
        opt.step()
    w = bal.weights()
    assert w["a"] < 1.0 < w["b"]


def test_equal_weights_sum_losses():
    bal = TaskBalancer(["a", "b"], "equal", window=1)
    bal.observe({"a": 1.0, "b": 5.0})
    assert bal({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}).item() == 3.0


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(cpu=True)


def _loader(n=10, bs=3):
    return DataLoader(
        TensorDataset(torch.arange(n)), batch_size=bs, sampler=EpochShuffle(n, seed=3), drop_last=True
    )


def test_stream_resume_equals_uninterrupted(accelerator):
    full = BatchStream(accelerator.prepare_data_loader(_loader()))
    uninterrupted = [next(full)[0].tolist() for _ in range(12)]
    first = BatchStream(accelerator.prepare_data_loader(_loader()))
    head = [next(first)[0].tolist() for _ in range(7)]
    resumed = BatchStream(accelerator.prepare_data_loader(_loader()))
    resumed.load_state(first.state())
    tail = [next(resumed)[0].tolist() for _ in range(5)]
    assert head + tail == uninterrupted
    epochs = [sorted(x for batch in uninterrupted[i : i + 3] for x in batch) for i in (0, 3, 6)]
    assert all(len(set(e)) == 9 for e in epochs)  # each epoch is a permutation (no repeats)
    assert uninterrupted[0:3] != uninterrupted[3:6]  # and epochs are shuffled differently


def test_stream_set_restores_pending_state(accelerator):
    streams = StreamSet(accelerator, lambda key: _loader())
    seen = [next(streams["a"])[0].tolist() for _ in range(4)]
    state = streams.state()
    fresh = StreamSet(accelerator, lambda key: _loader())
    fresh.load_state(state)  # before the stream exists: applied when it is first used
    again = StreamSet(accelerator, lambda key: _loader())
    expected = [next(again["a"])[0].tolist() for _ in range(6)][4:]
    assert [next(fresh["a"])[0].tolist() for _ in range(2)] == expected and seen


# ------------------------------------------------------------------------------------------ precision
def test_auto_precision_follows_the_hardware(monkeypatch):
    import workbench.hardware as hw

    for native, want in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(hw, "native_bf16", lambda native=native: native)
        assert hw.resolve_precision("auto") == want
        assert hw.resolve_precision("no") == "no" and hw.resolve_precision("bf16") == "bf16"
    # the real probe answers for this machine without raising
    assert isinstance(hw.native_bf16(), bool)


def test_runs_per_seed_seeds_each_run_and_reuses_finished_ones(tmp_path):
    import json

    from workbench.config import load_config
    from workbench.seeding import runs_per_seed

    calls = []

    def run(cfg, name, run_dir):
        calls.append((name, cfg.seed, run_dir))
        return {"seed": cfg.seed}

    (tmp_path / "b" / "seed1").mkdir(parents=True)  # a finished run from an earlier, interrupted study
    (tmp_path / "b" / "seed1" / "result.json").write_text(json.dumps({"accuracy": 0.5}))
    out = runs_per_seed(load_config(), ["a", "b"], [0, 1], tmp_path, run, cached=lambda r: r["accuracy"])
    assert out == {"a": {0: {"seed": 0}, 1: {"seed": 1}}, "b": {0: {"seed": 0}, 1: 0.5}}
    assert [(n, s) for n, s, _ in calls] == [("a", 0), ("a", 1), ("b", 0)]
    assert calls[2][2] == tmp_path / "b" / "seed0"


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_single_stream_updates_train_the_inference_path_and_skip_fusion(share):
    from workbench.config import load_config
    from workbench.modalities import default_tasks
    from workbench.model import build_model
    from workbench.model.synthetic import synthetic_batch
    from workbench.train.objectives import MultitaskSupervised

    torch.manual_seed(0)
    cfg = load_config(overrides=["model.preset=tiny", f"train.single_stream={share}"])
    tasks = {t.key: t for t in default_tasks()}
    model = build_model(cfg, list(tasks.values()))
    objective = MultitaskSupervised(model, cfg, list(tasks.values()))
    a, b = synthetic_batch(tasks["image/digit"], 4), synthetic_batch(tasks["audio/digit"], 4, seed=1)
    loss, parts = objective([a, b], step=0)
    loss.backward()
    assert set(parts) == {"image/digit", "audio/digit"}
    fused = any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.A.parameters())
    assert fused == (share == 0.0)  # single-stream updates never touch the cross-attention
    for key in ("image/digit", "audio/digit"):
        assert all(p.grad is not None for p in model.heads[key].parameters())
    if share == 0.0:
        with torch.no_grad():  # the pair update is exactly the two-stream forward
            pa, pb = model.forward_pair(a, b)
        assert torch.allclose(parts["image/digit"], model.task_loss("image/digit", pa, a.y))
        assert torch.allclose(parts["audio/digit"], model.task_loss("audio/digit", pb, b.y))


def test_single_stream_share_is_drawn_per_update_from_the_seed():
    from workbench.config import load_config
    from workbench.modalities import default_tasks
    from workbench.model import build_model
    from workbench.train.objectives import MultitaskSupervised

    cfg = load_config(overrides=["model.preset=tiny", "train.single_stream=0.3"])
    tasks = default_tasks()
    objective = MultitaskSupervised(build_model(cfg, tasks), cfg, tasks)
    draws = [objective.single_stream(step) for step in range(2000)]
    assert draws == [objective.single_stream(step) for step in range(2000)]  # replayable on resume
    assert 0.27 < sum(draws) / len(draws) < 0.33
    plain_cfg = load_config(overrides=["model.preset=tiny"])
    plain = MultitaskSupervised(build_model(plain_cfg, tasks), plain_cfg, tasks)
    assert [objective.plan(s) for s in range(50)] == [
        plain.plan(s) for s in range(50)
    ]  # the plan (pairs and tasks) does not depend on the share


@pytest.mark.parametrize("layer_decay", [1.0, 0.5])
def test_layer_decay_scales_each_layers_rate_from_the_heads_down(layer_decay):
    from workbench.config import load_config
    from workbench.modalities import default_tasks
    from workbench.model import build_model
    from workbench.train.loop import build_optimizer
    from workbench.train.objectives import MultitaskSupervised

    overrides = ["model.preset=tiny", "train.lr=1e-3", "train.steps=100", "train.warmup_steps=10",
                 f"train.layer_decay={layer_decay}"]  # fmt: skip
    cfg = load_config(overrides=overrides)
    tasks = default_tasks()
    model = build_model(cfg, tasks)
    optimizer, scheduler = build_optimizer(MultitaskSupervised(model, cfg, tasks), cfg)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable) == len(group_of)

    depth_f, depth_g = cfg.model.depth_f, cfg.model.depth_g
    top = depth_f + depth_g + 2

    def expected_scale(name: str) -> float:  # the layer each part of the network sits at
        parts = name.split(".")
        if parts[0] == "tokenizers":
            layer = 0
        elif parts[:3] == ["f", "body", "blocks"]:
            layer = 1 + int(parts[3])
        elif parts[0] in ("f", "A"):
            layer = depth_f + 1
        elif parts[:2] == ["g", "blocks"]:
            layer = depth_f + 2 + int(parts[2])
        else:  # g's final norm, heads, decoders
            layer = top
        return layer_decay ** (top - layer)

    def rates() -> dict[str, float]:
        return {n: group_of[id(p)]["lr"] for n, p in trainable}

    for _ in range(3):  # warm-up and cosine decay scale every group alike: the ratios hold
        for name, lr in rates().items():
            assert lr == pytest.approx(scheduler.get_last_lr()[0] * expected_scale(name), rel=1e-6), name
        optimizer.step()
        scheduler.step()
    head = next(n for n, _ in trainable if n.startswith("heads."))
    assert optimizer.param_groups[0]["lr"] == rates()[head]  # the logged rate is the heads' (full) rate
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, cfg.train.weight_decay}
    if layer_decay == 1.0:  # off: the two decay groups of before, every rate equal
        assert len(optimizer.param_groups) == 2
    else:
        assert min(rates().values()) == pytest.approx(max(rates().values()) * layer_decay**top)


def test_layer_decay_outside_zero_to_one_is_a_config_error():
    from workbench.config import load_config
    from workbench.errors import ConfigError

    for bad in ("0", "1.5", "-0.5"):
        with pytest.raises(ConfigError, match=r"train\.layer_decay=.* is outside"):
            load_config(overrides=[f"train.layer_decay={bad}"])


def test_task_sampling_weights_shift_the_plan_and_are_replayable():
    from workbench.config import load_config
    from workbench.errors import ConfigError
    from workbench.modalities import default_tasks
    from workbench.model import build_model
    from workbench.train.objectives import AlternatingSupervised, MultitaskSupervised

    tasks = default_tasks()
    weights = "train.task_sampling={text/digit: 3, video/motion: 0}"

    def objective(*overrides, cls=MultitaskSupervised):
        cfg = load_config(overrides=["model.preset=tiny", *overrides])
        return cls(build_model(cfg, tasks), cfg, tasks)

    uniform = objective("train.task_sampling={text/digit: 1, text/language: 1}")
    weighted = objective(weights, "train.task_sampling.text/language=1")  # merged over the default
    plans = [weighted.plan(s) for s in range(3000)]
    assert plans[:100] == [weighted.plan(s) for s in range(100)]  # a pure function of the step: resumable
    assert all(a.split("/")[0] != b.split("/")[0] for a, b in plans)  # still two different modalities
    share = lambda ps, key: sum(key in p for p in ps) / len(ps)  # noqa: E731
    base = [uniform.plan(s) for s in range(3000)]
    assert share(plans, "video/motion") == 0.0 < share(base, "video/motion")
    assert share(plans, "text/digit") > 1.6 * share(base, "text/digit")  # 0.25 -> ~0.5 of the updates
    # all-equal weights are the uniform sampling, draw for draw (older runs replay unchanged)
    same = objective("train.task_sampling={text/digit: 2, text/language: 2, image/digit: 2, image/denoise: 2, "
                     "audio/digit: 2, audio/language: 2, video/digit: 2, video/motion: 2}")  # fmt: skip
    assert [same.plan(s) for s in range(200)] == base[:200]
    alternating = objective(weights, "train.schedule=alternating", cls=AlternatingSupervised)
    drawn = [alternating.plan(s)[0] for s in range(2000)]
    assert "video/motion" not in drawn and 0.3 < drawn.count("text/digit") / len(drawn) < 0.4  # 3 / 8.5
    image_audio = [t for t in tasks if t.modality in ("image", "audio")]
    cfg = load_config(overrides=["model.preset=tiny", weights])  # names text and video tasks: ignored here
    assert cfg.train.task_sampling == {"text/digit": 3, "text/language": 0.5, "video/motion": 0}
    assert MultitaskSupervised(build_model(cfg, image_audio), cfg, image_audio).sampling is None
    with pytest.raises(ConfigError, match="txt/digit"):
        objective("train.task_sampling={txt/digit: 3}")
    with pytest.raises(ConfigError, match="two modalities"):
        objective("train.task_sampling={image/digit: 0, image/denoise: 0, audio/digit: 0, audio/language: 0, "
                  "video/digit: 0, video/motion: 0}")  # fmt: skip


def test_batch_scale_sizes_streams_and_pair_updates_score_every_row():
    """``train.batch_scale``: a modality's streams carry that many times the stream batch. A pair update
    fuses the first min(len) rows of its two streams row by row; the larger stream's other rows run
    the single-stream forward (stage 3) or the unimodal masked one (stage 2), so every row is scored
    once and a stream's loss is the mean over all its rows."""
    from workbench.config import load_config
    from workbench.errors import ConfigError
    from workbench.modalities import default_tasks
    from workbench.model import build_model
    from workbench.model.synthetic import synthetic_batch
    from workbench.train.objectives import MultitaskSupervised, PairwiseMasked

    tasks = default_tasks()
    spec = {t.key: t for t in tasks}
    overrides = [
        "model.preset=tiny",
        "train.batch_size=8",
        "train.batch_scale.text=2.5",
        "train.single_stream=0",
    ]
    cfg = load_config(overrides=overrides)
    torch.manual_seed(0)
    model = build_model(cfg, tasks).eval()  # eval: no training noise, so the parts below must match exactly
    s3 = MultitaskSupervised(model, cfg, tasks)
    assert s3.stream_batch_size("text/digit") == 10 and s3.stream_batch_size("image/digit") == 4
    image = synthetic_batch(spec["image/digit"], 4, seed=0)
    text = synthetic_batch(spec["text/digit"], 10, seed=1, text_tokens=10)
    with torch.no_grad():
        _, parts = s3([image, text], step=0)
        fused_image, fused_text = model.forward_pair(image, text.slice(0, 4))
        rest = model.forward_single(text.slice(4, 10), tasks=["digit"])["digit"]
        assert parts["text/digit"].item() == pytest.approx(
            model.task_loss("text/digit", torch.cat([fused_text, rest]), text.y).item(), rel=1e-5
        )
        assert parts["image/digit"].item() == pytest.approx(
            model.task_loss("image/digit", fused_image, image.y).item(), rel=1e-5
        )
        s2 = PairwiseMasked(model, cfg, tasks)
        _, parts = s2([image, text], step=3)
        g, ratio = s2._generator(3), cfg.train.mask_ratio
        w = cfg.train.mlm_visible_weight
        pair = model.forward_masked_pair(image, text.slice(0, 4), ratio["image"], ratio["text"], generator=g,
                                         visible_weight=w)  # fmt: skip
        alone = model.forward_masked(text.slice(4, 10), ratio["text"], generator=g, visible_weight=w)
        assert parts["text/masked"].item() == pytest.approx(
            (4 * pair[1].loss + 6 * alone.loss).item() / 10, rel=1e-5
        )
        assert parts["image/masked"].item() == pytest.approx(pair[0].loss.item(), rel=1e-5)
    for bad, match in (
        ("train.batch_scale.smell=2", "smell"),
        ("train.batch_scale.text=0", "batch_scale.text"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(overrides=[bad])


def _stage3_objective(schedule: str, *overrides: str):
    """(tasks by key, a tiny model in eval mode, its stage-3 objective of ``schedule``): in eval the
    model adds no training-time noise, so a loss part can be recomputed from the batch alone."""
    from workbench.config import load_config
    from workbench.modalities import default_tasks
    from workbench.model import build_model
    from workbench.train.objectives import AlternatingSupervised, MultitaskSupervised

    tasks = {t.key: t for t in default_tasks()}
    over = ["model.preset=tiny", "train.single_stream=1", f"train.schedule={schedule}", *overrides]
    cfg = load_config(overrides=over)
    torch.manual_seed(0)
    model = build_model(cfg, list(tasks.values())).eval()
    kind = AlternatingSupervised if schedule == "alternating" else MultitaskSupervised
    return tasks, model, kind(model, cfg, list(tasks.values()))


@pytest.mark.parametrize("schedule", ["pairs", "alternating"])
def test_label_smoothing_spreads_the_target_in_stage_3_classification_losses_only(schedule):
    import torch.nn.functional as F

    from workbench.config import ConfigError, load_config
    from workbench.model.synthetic import synthetic_batch

    tasks, model, objective = _stage3_objective(schedule, "train.label_smoothing=0.2")
    batches = [synthetic_batch(tasks["image/digit"], 4), synthetic_batch(tasks["image/denoise"], 4, seed=1)]
    batches = batches[:1] if schedule == "alternating" else batches
    if schedule == "alternating":
        objective.vary = False  # the batch as given: its logits are the ones compared below
    _, parts = objective(batches, step=0)
    with torch.no_grad():
        logits = model.forward_single(batches[0], tasks=["digit"])["digit"]
        assert parts["image/digit"].item() == pytest.approx(
            F.cross_entropy(logits, batches[0].y, label_smoothing=0.2).item(), rel=1e-5
        )
        assert parts["image/digit"].item() != pytest.approx(F.cross_entropy(logits, batches[0].y).item())
        if schedule == "pairs":  # a dense task's loss is untouched
            out = model.forward_single(batches[1], tasks=["denoise"])["denoise"]
            assert parts["image/denoise"].item() == pytest.approx(
                F.mse_loss(out, batches[1].y).item(), rel=1e-5
            )
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(overrides=["train.label_smoothing=1"])


@pytest.mark.parametrize("schedule", ["pairs", "alternating"])
def test_mixup_mixes_listed_signal_batches_and_their_targets_and_replays_its_draws(schedule):
    import torch.nn.functional as F

    from workbench.config import ConfigError, load_config
    from workbench.model.synthetic import synthetic_batch

    tasks, model, objective = _stage3_objective(schedule, "train.mixup={image: 0.4, audio: 0.4}")
    image = synthetic_batch(tasks["image/digit"], 8)
    mixed, perm, lam = objective.mix(image, step=5)
    assert 0.0 < lam < 1.0 and sorted(perm.tolist()) == list(range(8)) and perm.tolist() != list(range(8))
    torch.testing.assert_close(mixed.x, lam * image.x + (1 - lam) * image.x[perm])
    again, perm_again, lam_again = objective.mix(image, step=5)  # a resumed run draws the same
    assert lam_again == lam and torch.equal(perm_again, perm) and torch.equal(again.x, mixed.x)
    assert objective.mix(image, step=6)[2] != lam
    # variable-length rows keep the longer length; dense, text and unlisted batches pass untouched
    audio = synthetic_batch(tasks["audio/digit"], 6)
    audio.lengths = torch.tensor([800, 1200, 1600, 2000, 2400, 2400]).clamp(max=audio.x.shape[1])
    a_mixed, a_perm, _ = objective.mix(audio, step=1)
    assert torch.equal(a_mixed.lengths, torch.maximum(audio.lengths, audio.lengths[a_perm]))
    for key in ("image/denoise", "text/digit", "video/digit"):
        batch = synthetic_batch(tasks[key], 4)
        assert objective.mix(batch, step=1) == (batch, None, 1.0)
    # the logged loss is the same mix of the two targets' losses
    batches = [image, synthetic_batch(tasks["image/denoise"], 4, seed=1)][
        : 1 if schedule == "alternating" else 2
    ]
    if schedule == "alternating":
        objective.vary = False
    _, parts = objective(batches, step=5)
    with torch.no_grad():
        logits = model.forward_single(mixed, tasks=["digit"])["digit"]
    expected = lam * F.cross_entropy(logits, image.y) + (1 - lam) * F.cross_entropy(logits, image.y[perm])
    assert parts["image/digit"].item() == pytest.approx(expected.item(), rel=1e-5)
    for bad in ("train.mixup={text: 0.2}", "train.mixup={image: -1}"):
        with pytest.raises(ConfigError, match="mixup"):
            load_config(overrides=[bad])
