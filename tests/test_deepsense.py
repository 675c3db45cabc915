"""DeepSense-v2 (workbench/model/deepsense.py, workbench/deepsense.py): encoders, fusion, losses, retrieval, learning."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from workbench.config import load_config
from workbench.deepsense import (
    chance_levels,
    evaluate_retrieval,
    load_deepsense_data,
    retrieval_scores,
    retrieval_table,
    summarize,
    train_deepsense,
)
from workbench.errors import ConfigError
from workbench.hardware import torch_threads
from workbench.modalities import default_tasks
from workbench.model.deepsense import ENCODERS, ConvModule, DeepSense, PatchMerging, info_nce
from workbench.model.synthetic import synthetic_batch

TASKS = {t.key: t for t in default_tasks()}
# The learning budget: audio->image, ~9 s of training on one thread. Seeds 0, 1, 2 reached test R@1 0.32-0.40
# (chance 0.10) and MRR 0.45-0.56 (chance 0.26) with it. text->image learns too slowly for a unit test: its
# test split uses phrasings never seen in training (DATA_CARD.md), and after 120 updates seeds 0-2 reached
# only R@1 0.14-0.21; the study (notebook 22) reports it.
LEARN = ["model.preset=tiny", "data.scale=0.1", "train.batch_size=32", "train.lr=2e-3",
         "deepsense.pairs=[audio->image]"]  # fmt: skip
LEARN_STEPS = 80


def tiny_cfg(*overrides: str):
    return load_config(overrides=["model.preset=tiny", *overrides])


def batch(modality: str, n: int = 4, seed: int = 0, digits=(0, 1, 2, 0)):
    b = synthetic_batch(TASKS[f"{modality}/digit"], n, seed=seed, audio_seconds=0.5)
    return replace(b, digit=torch.tensor(digits[:n]))


# ------------------------------------------------------------------------------------ shapes, gradients
@pytest.mark.parametrize("modality", list(ENCODERS))
def test_every_encoder_gives_tokens_padding_and_a_pooled_vector(modality):
    torch.manual_seed(0)
    enc = ENCODERS[modality](tiny_cfg()).eval()
    b = batch(modality)
    out = enc(b.x, b.lengths)
    B, N, W = out.tokens.shape
    assert B == 4 and enc.width == W and out.pooled.shape == (4, enc.width)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    expected_n = {"image": 16, "video": 8, "text": 12}  # 4x4 units after 2 stages; 8 frames; 12 ids
    if modality in expected_n:
        assert expected_n[modality] == N
    if modality in ("audio", "text"):  # rows 2-4 are shorter: padding marks their tail
        assert out.padding is not None and out.padding.shape == (4, N) and not out.padding[0].any()
        assert out.padding[-1].any()
    if enc.objective == "masked":
        inp = enc.inputs(b.x, b.lengths)
        assert inp.target.shape == (4, N, enc.target_numel)


def test_every_parameter_gets_a_gradient_and_losses_are_per_pair():
    torch.manual_seed(0)
    model = DeepSense(tiny_cfg()).train()  # default pairs: text->image, audio->image, text->video
    total, keys = 0.0, []
    for q, g in model.pairs:
        losses = model(batch(q), batch(g, seed=1))
        keys.append(sorted(losses))
        assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
        total = total + sum(losses.values())
    assert keys == [
        ["contrastive", "image", "text"],
        ["audio", "contrastive", "image"],
        ["contrastive", "text"],
    ]
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0  # the temperature learns


def test_only_the_parts_that_train_are_built():
    model = DeepSense(tiny_cfg("deepsense.pairs=[text->image]", "deepsense.loss_weights.text=0"))
    assert list(model.encoders) == ["text", "image"] and list(model.fusion) == ["image"]
    assert set(model.token_proj) == {"text", "image"}  # text is the image stream's fusion context
    model = DeepSense(tiny_cfg("deepsense.pairs=[text->video]", "deepsense.loss_weights.text=0"))
    assert not model.fusion and not model.heads and not model.token_proj  # contrastive only
    assert model.encoders["video"].vit.mask_token is None


# ------------------------------------------------------------------------------------ encoder properties
@torch.no_grad()
def test_text_encoder_and_its_fused_lm_logits_are_causal():
    torch.manual_seed(0)
    model = DeepSense(tiny_cfg("deepsense.pairs=[text->image]")).eval()
    ids = torch.randint(4, 300, (2, 10), generator=torch.Generator().manual_seed(1))  # no padding
    context = model.encoders["image"](batch("image", 2).x)
    t = 4
    changed = ids.clone()
    changed[:, t + 1] = (ids[:, t + 1] + 7) % 296 + 4  # a different id at t+1 only
    ta, tb = model.encoders["text"](ids).tokens, model.encoders["text"](changed).tokens
    torch.testing.assert_close(ta[:, : t + 1], tb[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(ta[:, t + 1], tb[:, t + 1], atol=1e-4)  # position t+1 does see it
    la = model.heads["text"](model.fuse("text", ta, context, "image"))  # the LM logits, fused with an image
    lb = model.heads["text"](model.fuse("text", tb, context, "image"))
    torch.testing.assert_close(la[:, : t + 1], lb[:, : t + 1], rtol=0, atol=1e-6)
    # and nothing later than t leaks either (every later token replaced)
    later = ids.clone()
    later[:, t + 1 :] = 5
    torch.testing.assert_close(model.encoders["text"](later).tokens[:, : t + 1],
                               model.encoders["text"](ids).tokens[:, : t + 1], rtol=0, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("train", [False, True])
def test_conformer_conv_module_ignores_padding(norm, train):
    torch.manual_seed(0)
    conv = ConvModule(8, kernel=5, norm=norm).train(train)
    alone = torch.randn(1, 6, 8)
    garbage = torch.cat([alone, 100 * torch.randn(1, 4, 8)], 1)  # 4 padded frames of junk
    padding = torch.tensor([[False] * 6 + [True] * 4])
    out_alone, out_padded = conv(alone), conv(garbage, padding)
    torch.testing.assert_close(out_padded[:, :6], out_alone, rtol=0, atol=1e-5)
    assert not torch.allclose(conv(garbage)[:, :6], out_alone, atol=1e-3)  # the mask is what makes it so


@torch.no_grad()
def test_audio_encoder_gives_a_clip_the_same_features_alone_and_in_a_padded_batch():
    torch.manual_seed(0)
    enc = ENCODERS["audio"](tiny_cfg()).eval()
    b = batch("audio")  # row 0 full length, the others shorter
    both = enc(b.x[[0, 3]], b.lengths[[0, 3]])
    alone = enc(b.x[3:4, : int(b.lengths[3])], b.lengths[3:4])
    n = alone.tokens.shape[1]
    assert both.padding[1, :n].logical_not().all() and both.padding[1, n:].all()
    torch.testing.assert_close(both.tokens[1, :n], alone.tokens[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(both.pooled[1], alone.pooled[0], rtol=0, atol=1e-5)


def test_patch_merging_takes_2x2_neighbours_and_a_masked_unit_hides_the_whole_block():
    merge = PatchMerging(1)
    merge.norm, merge.reduction = torch.nn.Identity(), torch.nn.Identity()  # look at the concatenation
    merged, grid = merge(torch.arange(16.0).view(1, 16, 1), (4, 4))  # a 4x4 grid, value = row-major index
    assert grid == (2, 2) and merged.shape == (1, 4, 4)
    assert merged[0].tolist() == [[0, 4, 1, 5], [2, 6, 3, 7], [8, 12, 9, 13], [10, 14, 11, 15]]
    torch.manual_seed(0)
    enc = ENCODERS["image"](tiny_cfg()).eval()
    a, b = batch("image", 2).x, batch("image", 2, seed=9).x
    full = torch.ones(2, 16, dtype=torch.bool)  # every unit masked: the image no longer matters
    with torch.no_grad():
        torch.testing.assert_close(enc(a, mask=full).tokens, enc(b, mask=full).tokens)
        assert not torch.allclose(enc(a).tokens, enc(b).tokens)


# ------------------------------------------------------------------------------------ InfoNCE
def _nll(logits: list[float], positives: list[int]) -> float:
    z = math.log(sum(math.exp(v) for v in logits))
    return -sum(logits[p] - z for p in positives) / len(positives)


def test_info_nce_equals_a_hand_computed_reference_and_the_temperature_learns():
    za = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zb = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    scale = torch.tensor(math.log(2.0), requires_grad=True)  # exp(scale) = 2: logits [[1.2, 2], [1.6, 0]]
    # CLIP (pairs on the diagonal): rows a->b, columns b->a, each a cross-entropy
    rows = (_nll([1.2, 2.0], [0]) + _nll([1.6, 0.0], [1])) / 2
    cols = (_nll([1.2, 1.6], [0]) + _nll([2.0, 0.0], [1])) / 2
    loss = info_nce(za, zb, scale)
    assert loss.item() == pytest.approx((rows + cols) / 2, abs=1e-6)
    loss.backward()
    assert scale.grad is not None and float(scale.grad) != 0.0
    # labels: a = (0, 1), b = (1, 1). Row a0 has no positive (left out); a1 has both b's; each b has a1.
    loss = info_nce(za, zb, scale.detach(), torch.tensor([0, 1]), torch.tensor([1, 1]))
    rows = _nll([1.6, 0.0], [0, 1])
    cols = (_nll([1.2, 1.6], [1]) + _nll([2.0, 0.0], [1])) / 2
    assert float(loss) == pytest.approx((rows + cols) / 2, abs=1e-6)


def test_logit_scale_is_clamped_like_clip():
    model = DeepSense(tiny_cfg("deepsense.pairs=[text->image]", "deepsense.max_logit_scale=50"))
    assert model.temperature == pytest.approx(0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()
    assert model.temperature == pytest.approx(1 / 50, rel=1e-5)
    _, no_decay = model.optimizer_groups(0.05)
    assert any(p is model.logit_scale for p in no_decay["params"])


# ------------------------------------------------------------------------------------ retrieval metrics
def test_retrieval_scores_equal_a_hand_computed_example():
    q, g = torch.tensor([0, 1]), torch.tensor([0, 1, 0])
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.2, 0.6]])
    # query 0: g0 (relevant) first -> hit@1, RR 1. query 1: g0, g2, then g1 (relevant) -> rank 3, RR 1/3
    out = retrieval_scores(scores, q, g, ks=(1, 2, 3))
    assert out == pytest.approx({"R@1": 0.5, "R@2": 0.5, "R@3": 1.0, "MRR": (1 + 1 / 3) / 2})
    # negative cosines rank the same (torchmetrics' MRR would drop relevant items scored <= 0 unshifted)
    assert retrieval_scores(scores - 5.0, q, g, ks=(1, 2, 3)) == pytest.approx(out)
    labels = torch.arange(30) % 10  # a perfect embedding: the relevant items score highest
    z = torch.nn.functional.one_hot(labels, 10).float()
    perfect = retrieval_scores(z @ z.T, labels, labels)
    assert perfect == pytest.approx({"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "MRR": 1.0})


def test_chance_levels_are_exact_and_a_random_ranking_sits_near_them():
    q, g = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1, 2, 2])
    # brute force: every ordering of the gallery is equally likely under a random ranking
    hits = {1: 0.0, 2: 0.0}
    rr = 0.0
    orders = list(itertools.permutations(range(5)))
    for order in orders:
        for label in q.tolist():
            ranks = [i + 1 for i, j in enumerate(order) if int(g[j]) == label]
            rr += 1 / ranks[0]
            for k in hits:
                hits[k] += ranks[0] <= k
    n = len(orders) * len(q)
    exact = chance_levels(q, g, ks=(1, 2))
    assert exact == pytest.approx({"R@1": hits[1] / n, "R@2": hits[2] / n, "MRR": rr / n})
    gen = torch.Generator().manual_seed(0)
    ql, gl = torch.randint(0, 10, (2000,), generator=gen), torch.randint(0, 10, (50,), generator=gen)
    shuffled = retrieval_scores(torch.randn(2000, 50, generator=gen), ql, gl)
    chance = chance_levels(ql, gl)
    for name, value in shuffled.items():
        assert abs(value - chance[name]) < 0.035, (name, value, chance[name])  # ~3 sd over 2000 queries


def test_summarize_and_retrieval_table():
    rows = [{"seed": s, "direction": "text->image", "metric": "R@1", "value": v, "chance": 0.1}
            for s, v in ((0, 0.3), (1, 0.5))]  # fmt: skip
    (row,) = summarize(rows)
    assert row["mean"] == pytest.approx(0.4) and row["sd"] == pytest.approx(0.1414, abs=1e-4)
    assert row["seeds"] == 2 and row["chance"] == 0.1
    table = retrieval_table([row])
    assert table == {
        "columns": ["direction", "R@1", "chance R@1"],
        "rows": [["text->image", "40.0 ± 14.1", 10.0]],
    }


# ------------------------------------------------------------------------------------ configuration
def test_config_is_typed_and_checked(repo):
    cfg = load_config([repo / "configs" / "deepsense.yaml"])
    assert cfg.data.pairing == "aligned" and cfg.model.preset == "tiny"
    assert cfg.deepsense.pairs == ["text->image", "audio->image", "text->video"]
    for bad, message in [
        ("deepsense.pairs=[text->text]", "two different modalities"),
        ("deepsense.pairs=[txt->image]", "did you mean 'text'"),
        ("deepsense.pairs=[text->image,image->text]", "twice"),
        ("deepsense.loss_weights.video=1", "loss_weights key"),
        ("deepsense.mask_ratio.text=0.5", "mask_ratio key"),
        ("deepsense.conv_kernel=4", "odd"),
        ("deepsense.conv_norm=group", "not one of"),
        ("deepsense.temperature=0.001", "beyond the clamp"),
        ("deepsense.positive=pair", "closest valid key is 'deepsense.positives'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=[bad])


# ------------------------------------------------------------------------------------ a tiny run learns
@pytest.fixture(scope="module")
def learn_data():
    return load_deepsense_data(load_config(overrides=LEARN))


def test_training_is_seeded_and_accumulates_gradients(learn_data):
    cfg = load_config(overrides=LEARN)
    with torch_threads(1):
        first = train_deepsense(cfg, 2, data=learn_data, log_every=1).history
        again = train_deepsense(cfg, 2, data=learn_data, log_every=1).history
        other = train_deepsense(replace(cfg, seed=1), 2, data=learn_data, log_every=1).history
        accum = train_deepsense(load_config(overrides=[*LEARN, "train.grad_accum=2"]), 2, data=learn_data,
                                log_every=1).history  # fmt: skip
    assert first == again and [r["loss"] for r in first] != [r["loss"] for r in other]
    assert set(first[0]) == {"step", "loss", "lr", "temperature", "loss/contrastive/audio->image",
                             "loss/audio/audio->image", "loss/image/audio->image"}  # fmt: skip
    w = cfg.deepsense.loss_weights
    parts = sum(w[k.split("/")[1]] * v for k, v in first[0].items() if k.startswith("loss/"))
    assert first[0]["loss"] == pytest.approx(parts, rel=1e-5)  # the one weighting of the logged losses
    assert accum[0]["loss"] != first[0]["loss"]  # two micro-batches averaged: another estimate


@pytest.mark.slow
def test_a_tiny_run_learns_audio_to_image_retrieval(learn_data):
    cfg = load_config(overrides=LEARN)
    run = train_deepsense(cfg, LEARN_STEPS, data=learn_data, threads=1)
    rows = evaluate_retrieval(run.model, learn_data, extra={"seed": 0})
    got = {r["metric"]: r for r in rows}
    assert list(got) == ["R@1", "R@5", "R@10", "MRR"] and rows[0]["seed"] == 0
    assert got["R@1"]["queries"] == 50 and got["R@1"]["gallery"] == 50  # every test clip and image
    assert got["R@1"]["chance"] == pytest.approx(0.1, abs=0.02)
    # chance R@1 ~0.10 over 50 queries: P(R@1 >= 0.24 | chance) ~ 0.003 for independent queries
    assert got["R@1"]["value"] >= 0.24, rows
    assert got["MRR"]["value"] >= got["MRR"]["chance"] + 0.1, rows
    first, last = run.history[0], run.history[-1]
    assert last["loss/contrastive/audio->image"] < first["loss/contrastive/audio->image"]
