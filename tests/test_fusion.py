"""Fusion strategies (workbench/fusion.py): shapes, gradients, missing modalities, noise, and a tiny run that learns."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from workbench.config import load_config
from workbench.errors import ConfigError
from workbench.fusion import (
    READOUTS,
    STRATEGIES,
    PairClassifier,
    add_noise,
    conditions,
    evaluate_fusion,
    load_fusion_data,
    summarize,
    train_fusion,
)
from workbench.modalities import default_tasks
from workbench.model.synthetic import synthetic_batch

TASKS = {t.key: t for t in default_tasks()}
PAIR = (TASKS["image/digit"], TASKS["audio/digit"])
# The learning budget: ~15 s per strategy on one thread of a busy 2-core machine. Seeds 0 and 1 both
# reached 0.30-0.48 test accuracy (both streams) with it; training runs on one thread, so it is exact.
LEARN = ["model.preset=tiny", "data.scale=0.1", "train.batch_size=32", "train.lr=2e-3"]
LEARN_STEPS = 100


def tiny_cfg(*overrides: str):
    return load_config(overrides=["model.preset=tiny", *overrides])


def pair_batches(n: int = 4, seed: int = 0):
    a = synthetic_batch(PAIR[0], n, seed=seed)
    b = synthetic_batch(PAIR[1], n, seed=seed + 1, audio_seconds=0.5)
    return a, replace(b, y=a.y)  # aligned: both streams carry the same label


def model_for(strategy: str, readout: str = "logits") -> PairClassifier:
    torch.manual_seed(0)
    return PairClassifier(tiny_cfg(), strategy, PAIR, readout).eval()


# ------------------------------------------------------------------------------------ shapes, gradients
@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shapes_and_every_parameter_gets_a_gradient(strategy, readout):
    model = model_for(strategy, readout).train()
    a, b = pair_batches()
    for pair in ((a, b), (a, None), (None, b)):
        logits = model(*pair)
        assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    model.zero_grad()
    F.cross_entropy(model(a, b), a.y).backward()
    names = [n for n, p in model.named_parameters()]
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"{strategy}/{readout}: no gradient reaches {missing}"
    assert any(n.startswith("net.A.") for n in names) == (strategy == "hybrid")
    assert any("modality_embed" in n for n in names) == (strategy == "early")
    assert not any(n.startswith(("net.decoders1.", "net.decoders2.")) for n in names)  # removed: unused


def test_bad_construction_is_refused():
    with pytest.raises(ConfigError, match="strategy"):
        PairClassifier(tiny_cfg(), "middle", PAIR)
    with pytest.raises(ConfigError, match="readout"):
        PairClassifier(tiny_cfg(), "late", PAIR, readout="vote")
    with pytest.raises(ConfigError, match="two different modalities"):
        PairClassifier(tiny_cfg(), "late", (PAIR[0], PAIR[0]))
    with pytest.raises(ConfigError, match="same labels"):
        PairClassifier(tiny_cfg(), "late", (PAIR[0], TASKS["audio/language"]))
    model = model_for("late")
    _, b = pair_batches()
    with pytest.raises(ValueError, match="at least one"):
        model(None, None)
    with pytest.raises(ValueError, match="stream A expects image"):
        model(b, None)


# ------------------------------------------------------------------------------------ missing modality
@torch.no_grad()
def test_late_fusion_with_a_stream_dropped_is_that_stream_alone():
    model = model_for("late")
    a, b = pair_batches()
    own_a = model.net.forward_single(a, tasks=["digit"])["digit"]
    own_b = model.net.forward_single(b, tasks=["digit"])["digit"]
    assert torch.equal(model(a, None), own_a)  # exactly A's own logits
    assert torch.equal(model(None, b), own_b)
    torch.testing.assert_close(model(a, b), (own_a + own_b) / 2)  # both: the logits averaged


@torch.no_grad()
def test_hybrid_with_a_stream_dropped_takes_the_single_stream_path():
    model = model_for("hybrid")
    a, b = pair_batches()
    assert torch.equal(model(a, None), model.net.forward_single(a, tasks=["digit"])["digit"])
    assert not torch.allclose(model(a, b), model(a, None))


@pytest.mark.parametrize("strategy", ["early", "hybrid"])
@torch.no_grad()
def test_dropping_or_changing_a_stream_changes_the_input_of_the_joint_forward(strategy):
    model = model_for(strategy)
    a, b = pair_batches()
    _, other = pair_batches(seed=5)
    both = model(a, b)
    assert not torch.allclose(both, model(a, None), atol=1e-4)  # dropping B changes A's prediction
    assert not torch.allclose(both, model(a, replace(other, y=a.y)), atol=1e-4)  # so does another B
    # early fusion: the remaining stream runs alone with its modality embedding
    if strategy == "early":
        p, x, coords = model.net.tokenize(a)
        z = model.net.g(model.net.f(x + model.modality_embed.weight[0], p.padding), p.padding)
        assert torch.equal(model(a, None), model.net._predict("image/digit", z, p.padding, coords))


@torch.no_grad()
def test_concat_readout_leaves_a_dropped_streams_slot_zero():
    model = model_for("late", "concat")
    a, _ = pair_batches()
    w = model.classifier.in_features // 2
    pooled_a = model.net.features(a)  # masked mean of g(f(x))
    expect = model.classifier(torch.cat([pooled_a, torch.zeros(4, w)], -1))
    torch.testing.assert_close(model(a, None), expect)


# ------------------------------------------------------------------------------------ noise
def test_add_noise_hits_the_requested_snr_and_keeps_padding_silent():
    b = synthetic_batch(PAIR[1], 4, seed=0, audio_seconds=1.0)  # rows shorter than the first are padded
    g = torch.Generator().manual_seed(0)
    for snr in (20.0, 0.0, -10.0):
        noisy = add_noise(b, snr, g)
        noise = noisy.x - b.x
        for i, n in enumerate(b.lengths.tolist()):
            assert torch.all(noise[i, n:] == 0)
            measured = 10 * torch.log10(b.x[i, :n].pow(2).mean() / noise[i, :n].pow(2).mean())
            assert abs(float(measured) - snr) < 0.3
    first = add_noise(b, 0.0, torch.Generator().manual_seed(1)).x
    assert torch.equal(first, add_noise(b, 0.0, torch.Generator().manual_seed(1)).x)  # seeded
    image = synthetic_batch(PAIR[0], 2)
    assert add_noise(image, 10.0).x.shape == image.x.shape
    text = synthetic_batch(TASKS["text/digit"], 2)
    with pytest.raises(ConfigError, match="discrete"):
        add_noise(text, 10.0)


def test_conditions_cover_both_drops_and_noise_levels():
    names = [c.name for c in conditions(("image", "audio"), (10, 0))]
    assert names == ["both", "no image", "no audio", "image noise 10 dB", "image noise 0 dB",
                     "audio noise 10 dB", "audio noise 0 dB"]  # fmt: skip
    # text ids get no Gaussian noise
    names = [c.name for c in conditions(("image", "text"), (10,), discrete=(False, True))]
    assert names == ["both", "no image", "no text", "image noise 10 dB"]


def test_summarize_mean_and_sample_sd():
    rows = [{"strategy": "late", "condition": "both", "accuracy": a} for a in (0.5, 0.7)]
    (row,) = summarize(rows)
    assert row["mean"] == pytest.approx(0.6) and row["sd"] == pytest.approx(0.1414, abs=1e-4)
    assert row["seeds"] == 2


def test_fusion_config_file_resolves(repo):
    cfg = load_config([repo / "configs" / "fusion.yaml"])
    assert cfg.data.pairing == "aligned" and len(cfg.data.modalities) == 2


# ------------------------------------------------------------------------------------ a tiny run learns
@pytest.fixture(scope="module")
def learn_data():
    return load_fusion_data(load_config(overrides=LEARN))


def test_training_is_seeded(learn_data):
    cfg = load_config(overrides=LEARN)
    first = train_fusion(cfg, "hybrid", 3, data=learn_data, log_every=1).history
    again = train_fusion(cfg, "hybrid", 3, data=learn_data, log_every=1).history
    assert [r["loss"] for r in first] == [r["loss"] for r in again]
    other = train_fusion(replace(cfg, seed=1), "hybrid", 3, data=learn_data, log_every=1).history
    assert [r["loss"] for r in first] != [r["loss"] for r in other]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_tiny_run_learns_above_chance_on_aligned_pairs(strategy, learn_data):
    run = train_fusion(load_config(overrides=LEARN), strategy, LEARN_STEPS, data=learn_data)
    rows = evaluate_fusion(run.model, learn_data, snr_db=(), extra={"seed": 0})
    acc = {r["condition"]: r["accuracy"] for r in rows}
    assert set(acc) == {"both", "no image", "no audio"} and rows[0]["n"] == 50 and rows[0]["seed"] == 0
    # chance is 0.1; on 50 test pairs P(accuracy >= 0.25 | chance) < 1e-3
    assert acc["both"] >= 0.25, f"{strategy}: {json.dumps(acc)} after {run.seconds:.1f} s"
    assert run.history[-1]["loss"] < run.history[0]["loss"]
