"""The OmniVec2 network: every preset x modality x task, gradients, masks, checkpoints, capture, silencing."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
import torch.nn.functional as F

from workbench.batch import Batch
from workbench.config import load_config, read_saved_config
from workbench.errors import CheckpointError, ConfigError, MediaError
from workbench.modalities import MODALITIES, SAMPLE_RATE, TaskSpec, default_tasks
from workbench.model import OmniVec2, TextTokenizer, build_model
from workbench.model.patching import grid_to_signal, sincos_embedding
from workbench.model.synthetic import synthetic_batch
from workbench.model.tokenizers import positions

TASKS = default_tasks()
PRESETS = ["tiny", "small"]
# pairs of tasks whose union covers every task and every modality (stage-3 two-stream steps)
PAIRS = [
    ("image/digit", "audio/digit"),
    ("audio/language", "text/digit"),
    ("text/language", "video/digit"),
    ("video/motion", "image/denoise"),
]
_models: dict[tuple, OmniVec2] = {}


def model_for(preset: str = "tiny", *overrides: str, tasks=None) -> OmniVec2:
    key = (preset, overrides, tasks is None)
    if key not in _models or tasks is not None:
        torch.manual_seed(0)
        cfg = load_config(overrides=[f"model.preset={preset}", *overrides])
        model = build_model(cfg, tasks or TASKS)
        if tasks is not None:
            return model.eval()
        _models[key] = model
    return _models[key].eval()


def batch(key: str, n: int = 3, seed: int = 0) -> Batch:
    task = next(t for t in TASKS if t.key == key)
    return synthetic_batch(task, n, seed=seed, audio_seconds=0.5, text_tokens=10)


def _stems(kind: str, trunk: str = "strided") -> tuple[str, ...]:
    return (f"model.stem={{image: {kind}, audio: {kind}, video: {kind}}}", f"model.stem_trunk={trunk}")


def expected_shape(task: TaskSpec, n: int) -> tuple:
    return (n, task.num_classes) if task.kind == "classification" else (n, *task.shape)


# ------------------------------------------------------------------------------------ shapes, no NaN
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.key)
def test_single_stream_shapes_and_finite(preset, task):
    model = model_for(preset)
    with torch.no_grad():
        out = model.forward_single(batch(task.key))
    mine = [t for t in TASKS if t.modality == task.modality]
    assert set(out) == {t.name for t in mine}
    for t in mine:
        assert out[t.name].shape == expected_shape(t, 3)
        assert torch.isfinite(out[t.name]).all()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(("ka", "kb"), PAIRS)
def test_two_stream_shapes_and_finite(preset, ka, kb):
    model = model_for(preset)
    with torch.no_grad():
        pa, pb = model.forward_pair(batch(ka), batch(kb, seed=1))
    assert pa.shape == expected_shape(model.tasks[ka], 3) and pb.shape == expected_shape(model.tasks[kb], 3)
    assert torch.isfinite(pa).all() and torch.isfinite(pb).all()


def test_base_preset_builds_and_runs_one_sample():
    model = model_for("base")
    assert model.parameter_counts()["f"] > 80_000_000  # ViT-Base-sized f
    with torch.no_grad():
        out = model.forward_single(batch("image/digit", 1))
    assert out["digit"].shape == (1, 10) and torch.isfinite(out["digit"]).all()


# ------------------------------------------------------------------------------------------ gradients
def _grads_missing(model: OmniVec2, prefixes: tuple[str, ...]) -> list[str]:
    return [
        n
        for n, p in model.named_parameters()
        if n.startswith(prefixes) and (p.grad is None or p.grad.abs().sum() == 0)
    ]


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("tiny", ()),
        ("small", ()),
        ("tiny", ("model.tokenizer=unified", "model.task_head=unified")),
        ("tiny", ("model.task_head=autoencoder",)),
        ("tiny", ("model.tokenizer=unified",)),
        ("tiny", _stems("conv")),
        ("tiny", _stems("both", "pooled")),
    ],
)
def test_two_stream_training_reaches_every_parameter(preset, overrides):
    model = model_for(preset, *overrides).train()
    if len(model.refiners):  # a refiner's zero-initialised output conv passes no gradient until it moves
        model = model_for(preset, *overrides, tasks=TASKS).train()  # a private copy to move
        for refiner in model.refiners.values():
            torch.nn.init.normal_(refiner.net[-1].weight, std=0.01)
    model.zero_grad()
    for ka, kb in PAIRS:
        a, b = batch(ka), batch(kb, seed=1)
        pa, pb = model.forward_pair(a, b)
        (model.task_loss(ka, pa, a.y) + model.task_loss(kb, pb, b.y)).backward()
    assert _grads_missing(model, ("tokenizers", "f.", "A.", "g.", "heads", "refiners")) == []
    # decoders are reached through the masked paths: stage 1 per modality, stage 2 over pairs
    model.zero_grad()
    for m in MODALITIES:
        model.forward_masked(batch(f"{m}/{MODALITIES[m].default_tasks[0].name}"), 0.5).loss.backward()
    assert _grads_missing(model, ("decoders1",)) == []
    assert _grads_missing(model, ("A.", "g.", "heads", "decoders2")) == _names(
        model, ("A.", "g.", "heads", "decoders2")
    )
    model.zero_grad()
    for ka, kb in PAIRS[:3]:  # covers all four modalities
        oa, ob = model.forward_masked_pair(batch(ka), batch(kb, seed=1), 0.5, 0.5)
        (oa.loss + ob.loss).backward()
    assert _grads_missing(model, ("decoders2", "A.", "g.")) == []
    model.zero_grad()


def _names(model, prefixes):
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


# ----------------------------------------------------------------------------------- masks and padding
@pytest.mark.parametrize(
    ("key", "preset"), [("audio/digit", "tiny"), ("audio/digit", "small"), ("text/digit", "tiny")]
)
def test_padding_does_not_change_a_sample(key, preset):
    """A short clip/sentence gives the same outputs alone as inside a batch padded for a longer one;
    on `small` the clip runs through the pooled stem, whose convolutions reach past a token's frames."""
    model = model_for(preset)
    full = batch(key, 3)
    short = Batch(
        full.modality, full.task, full.x[2:3, : int(full.lengths[2])], full.y[2:3], full.lengths[2:3]
    )
    with torch.no_grad():
        together = model.forward_single(full)
        alone = model.forward_single(short)
    for name in alone:
        torch.testing.assert_close(together[name][2:3], alone[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["image/digit", "audio/digit", "text/digit", "video/digit"])
def test_masked_outputs_line_up_with_the_input_tokens(key):
    model = model_for("tiny")
    b = batch(key, 3)
    with torch.no_grad():
        out = model.forward_masked(b, 0.75, generator=torch.Generator().manual_seed(0))
    p = model.patchers[b.modality](b.x, b.lengths)
    assert out.mask.shape == p.values.shape[:2] and out.pred.shape[:2] == out.mask.shape
    assert out.target.shape == (
        p.values.shape if not model.patchers[b.modality].discrete else p.values.shape[:2]
    )
    assert out.mask.sum() > 0 and torch.isfinite(out.loss) and torch.isfinite(out.pred).all()


def test_masked_lm_scores_kept_tokens_at_the_visible_weight():
    """train.mlm_visible_weight=w: the text loss averages cross-entropy over masked tokens (weight 1) and
    kept valid tokens (weight w), never padding; w=0 is BERT's masked-only loss; signals ignore w."""
    model = model_for("tiny")
    b = batch("text/digit", 6)
    valid = (~model.patchers["text"](b.x, b.lengths).padding).float()
    assert (valid == 0).any()  # some rows are padded
    losses = {}
    with torch.no_grad():
        for w in (0.0, 0.5):
            out = model.forward_masked(b, 0.3, generator=torch.Generator().manual_seed(1), visible_weight=w)
            ce = torch.nn.functional.cross_entropy(
                out.pred.flatten(0, 1), out.target.flatten(), reduction="none"
            )
            weight = out.mask + w * valid * (1 - out.mask)
            torch.testing.assert_close(out.loss, (ce.view_as(weight) * weight).sum() / weight.sum())
            losses[w] = out.loss
        image = batch("image/digit", 3)
        a, c = (
            model.forward_masked(
                image, 0.75, generator=torch.Generator().manual_seed(0), visible_weight=w
            ).loss
            for w in (0.0, 1.0)
        )
    assert not torch.equal(losses[0.0], losses[0.5]) and torch.equal(a, c)


def test_kept_padding_slots_cannot_leak_removed_tokens():
    """Variable-length rows keep different counts; the extra kept slots hold removed tokens, which
    neither f (key padding) nor the decoder (mask token overwrite) may read."""
    from workbench.model.masking import random_masking

    model = model_for("tiny")
    torch.manual_seed(0)
    lengths = torch.tensor([12, 8, 3])
    padding = torch.arange(12)[None] >= lengths[:, None]
    x = torch.randn(3, 12, model.config.model.dim)
    coords = torch.arange(12.0)[:, None]

    def run(tokens):
        m = random_masking(tokens, 0.5, padding, generator=torch.Generator().manual_seed(3))
        z = model.f(m.kept, m.kept_padding)
        return m, model.decoders1["audio"](z, coords, padding, m)

    with torch.no_grad():
        m, pred = run(x)
        assert m.kept_padding.any()  # rows 1 and 2 keep fewer than row 0
        hidden = (m.mask.bool() | padding)[..., None]
        _, pred2 = run(torch.where(hidden, torch.randn_like(x) * 10, x))
    valid = ~padding
    torch.testing.assert_close(pred[valid], pred2[valid], atol=1e-5, rtol=0)


def test_masked_loss_is_scored_exactly_on_removed_tokens():
    model = model_for("tiny").train()
    for key in ("image/digit", "audio/digit", "text/digit"):
        b = batch(key, 3)
        out = model.forward_masked(b, 0.6, generator=torch.Generator().manual_seed(2))
        pred = out.pred.detach().requires_grad_(True)
        rerun = model._masked_output(b.modality, pred, _visible_like(out))
        torch.testing.assert_close(rerun.loss, out.loss)
        rerun.loss.backward()
        touched = pred.grad.abs().sum(-1) > 0  # (B, N)
        assert torch.equal(touched, out.mask.bool()), key
        padding = model.patchers[b.modality](b.x, b.lengths).padding
        if padding is not None:
            assert not out.mask.bool()[padding].any()


def _visible_like(out):
    class V:  # the fields _masked_output reads
        target, mask = out.target, out.mask

    return V


def _removed_signal(model: OmniVec2, b: Batch, mask: torch.Tensor) -> torch.Tensor:
    """The removed tokens' mask (B, N) as a boolean picture/clip shaped like ``b.x``."""
    patcher = model.patchers[b.modality]
    p = patcher(b.x, b.lengths)
    per_value = mask.bool().unsqueeze(-1).expand(-1, -1, patcher.patch_numel)
    signal = grid_to_signal(per_value, p.grid, patcher.patch_shape)  # (B, 1, ...)
    return signal if b.modality == "image" else signal.transpose(1, 2)  # video: (B, T, 1, H, W)


@pytest.mark.parametrize(
    "stem",
    [("linear", "strided"), ("conv", "strided"), ("both", "strided"), ("conv", "pooled"), ("both", "pooled")],
)
@pytest.mark.parametrize("key", ["image/digit", "video/digit"])
def test_removed_pixels_cannot_leak_into_the_prediction(key, stem):
    """Changing only the removed tokens' pixels leaves every prediction identical, also through a
    convolutional stem whose receptive field crosses patch borders (it sees removed patches as zeros)."""
    model = model_for("tiny", *_stems(*stem))
    b = batch(key, 3)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    with torch.no_grad():
        out = model.forward_masked(b, 0.75, generator=gen())
        x2 = torch.where(_removed_signal(model, b, out.mask), torch.rand_like(b.x), b.x)
        out2 = model.forward_masked(Batch(b.modality, b.task, x2, b.y), 0.75, generator=gen())
        # the same change made to kept pixels does reach the prediction
        x3 = torch.where(_removed_signal(model, b, 1 - out.mask), torch.rand_like(b.x), b.x)
        out3 = model.forward_masked(Batch(b.modality, b.task, x3, b.y), 0.75, generator=gen())
    assert torch.equal(out.mask, out2.mask)
    torch.testing.assert_close(out.pred, out2.pred, atol=1e-6, rtol=0)
    assert not torch.allclose(out.target, out2.target)
    assert not torch.allclose(out.pred, out3.pred, atol=1e-4)


def test_conv_stem_tokens_see_across_patch_borders_and_keep_the_grid():
    """Unmasked, a stem token depends on its neighbours' pixels (a linear patch token does not)."""
    b = batch("image/digit", 2)
    for stem, crosses in (("linear", False), ("conv", True)):
        model = model_for("tiny", f"model.stem.image={stem}")
        with torch.no_grad():
            _, x, _ = model.tokenize(b)
            x2 = b.x.clone()
            x2[:, :, 4:8, 4:8] += 1.0  # the pixels of token (1, 1) only
            _, y, _ = model.tokenize(Batch(b.modality, b.task, x2, b.y))
        changed = (x - y).abs().amax(-1).view(2, 7, 7) > 1e-6
        # 3x3 stride-2 twice: token j sees pixels 4j-3 .. 4j+3, so pixels 4-7 reach tokens 1 and 2
        expect = torch.zeros(7, 7, dtype=torch.bool)
        expect[1:3, 1:3] = crosses
        expect[1, 1] = True
        assert torch.equal(changed, expect.expand(2, 7, 7)), stem


def test_stem_maps_each_signal_to_its_projection():
    from workbench.model.tokenizers import ConvStem, PooledStem, StridedStem

    model = model_for("tiny", "model.stem={image: conv}")  # merged over tiny's {image: both}
    kinds = {m: type(p).__name__ for m, p in model.tokenizers.items()}
    assert kinds == {"image": "StridedStem", "audio": "Linear", "text": "Embedding", "video": "Linear"}
    assert model.config.model.stem == {"image": "conv", "audio": "linear", "video": "linear"}
    every = model_for("tiny", *_stems("conv"))
    assert all(isinstance(every.tokenizers[m], StridedStem) for m in ("image", "audio", "video"))
    linear = model_for("tiny", "model.stem.image=linear")
    assert not any(isinstance(p, ConvStem) for p in linear.tokenizers.values())
    default = model_for("tiny").tokenizers["image"]  # tiny: the strided stem beside the linear projection
    assert isinstance(default, StridedStem) and default.linear is not None
    small = model_for("small").tokenizers  # small: pooled stems, beside the linear projection on images/audio
    assert isinstance(small["image"], PooledStem) and small["image"].linear is not None
    assert isinstance(small["audio"], PooledStem) and small["audio"].linear is not None
    assert isinstance(small["video"], PooledStem) and small["video"].linear is None
    for bad, match in (
        ("model.stem.text=conv", "model.stem key"),
        ("model.stem.image=cnn", "model.stem.image"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(overrides=[bad])
    with pytest.raises(ConfigError, match="stem_trunk"):
        load_config(overrides=["model.stem_trunk=deep"])
    both = model_for("tiny", "model.stem.image=both")  # the stem and the linear projection, summed
    b = batch("image/digit", 2)
    stem = both.tokenizers["image"]
    with torch.no_grad():
        patches = both.patchers["image"](b.x)
        conv_only = stem.embed(grid_to_signal(patches.values, patches.grid, stem.patch_shape), patches.grid)
        assert torch.allclose(
            stem(patches.values, patches.grid), conv_only + stem.linear(patches.values), atol=1e-6
        )


def test_strided_stem_needs_power_of_two_patches_and_the_pooled_one_does_not():
    cfg = load_config(overrides=["model.preset=tiny", "model.stem.image=conv", "model.patch_size=7"])
    with pytest.raises(ConfigError, match="powers of two"):
        build_model(cfg, TASKS)
    cfg = load_config(
        overrides=[
            "model.preset=tiny",
            "model.stem.image=conv",
            "model.patch_size=7",
            "model.stem_trunk=pooled",
        ]
    )
    model = build_model(cfg, TASKS).eval()
    with torch.no_grad():
        p, x, _ = model.tokenize(batch("image/digit", 2))
    assert p.grid == (4, 4) and x.shape == (2, 16, cfg.model.dim)


def test_pooled_stems_run_channels_last_and_compute_what_the_default_layout_does():
    from workbench.model.tokenizers import PooledStem

    model = model_for("small")
    for key in ("image/digit", "video/digit"):
        stem = model.tokenizers[key.split("/")[0]]
        assert isinstance(stem, PooledStem)
        layouts: list[bool] = []
        hook = stem.net[0].register_forward_hook(
            lambda m, args, out, seen=layouts: seen.append(
                out.is_contiguous(memory_format=torch.channels_last)
            )
        )
        p = model.patchers[key.split("/")[0]](batch(key, 4).x)
        signal = grid_to_signal(p.values, p.grid, stem.patch_shape)
        with torch.no_grad():
            tokens = stem.embed(signal, p.grid)
            hook.remove()
            frames = signal if signal.ndim == 4 else signal.transpose(1, 2).flatten(0, 1)
            y = frames.contiguous()  # the default layout, level by level
            y = F.adaptive_max_pool2d(stem.net(y), p.grid[-2:])
            y = y.reshape(len(signal) * (1 if signal.ndim == 4 else p.grid[0]), -1, *p.grid[-2:])
            expect = stem.proj(y).flatten(2).transpose(1, 2).reshape(len(signal), -1, tokens.shape[-1])
        assert layouts == [True], key  # the first convolution's output: every level after it follows
        assert torch.allclose(tokens, expect, atol=1e-4), (key, (tokens - expect).abs().max())


def test_small_reads_images_and_clips_as_16_tokens_through_pooled_stems():
    model = model_for("small")
    for key in ("image/digit", "video/digit"):
        with torch.no_grad():
            p, x, _ = model.tokenize(batch(key, 2))
        assert x.shape == (2, 16, 192), key
    assert p.grid == (4, 2, 2)  # video: 4 tubelets of 2 frames x 2x2 cells of 16x16 pixels


def test_pooled_stem_reads_a_clip_frame_by_frame_and_a_tubelet_as_one_token():
    """Changing frame 2 changes exactly the tokens of the second tubelet (frames 2-3), every one of its
    cells that the change reaches and no other time step: the 2-D levels run per frame, a tubelet's
    frames meet only in the projection. A picture's token depends on its own cell and its neighbours'."""
    model = model_for("tiny", "model.stem.video=conv", "model.stem_trunk=pooled", "model.video_patch=16")
    b = batch("video/digit", 2)
    with torch.no_grad():
        _, x, _ = model.tokenize(b)
        x2 = b.x.clone()
        x2[:, 2] = torch.rand_like(x2[:, 2])  # all of frame 2
        _, y, _ = model.tokenize(Batch(b.modality, b.task, x2, b.y))
    changed = ((x - y).abs().amax(-1) > 1e-6).view(2, 4, 4)  # (B, time steps, 2x2 cells)
    assert changed[:, 1].all() and not changed[:, [0, 2, 3]].any()
    # gradients reach every stem parameter through the pooled tokens
    stem = model.tokenizers["video"]
    model.zero_grad()
    model.tokenize(b)[1].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters())
    model.zero_grad()


def test_audio_masking_with_variable_lengths_keeps_no_padding():
    model = model_for("tiny")
    b = batch("audio/digit", 4)
    with torch.no_grad():
        out = model.forward_masked(b, 0.9, generator=torch.Generator().manual_seed(0))
    padding = model.patchers["audio"](b.x, b.lengths).padding
    valid = (~padding).sum(1)
    assert torch.equal(out.mask.sum(1).long(), valid - (valid * 0.1).floor().long().clamp(min=1))


# -------------------------------------------------------------------------------------- checkpoints
def _tokenizer() -> TextTokenizer:
    texts = ["one two three four five", "eins zwei drei vier", "un deux trois", "uno dos tres cuatro"] * 5
    return TextTokenizer.train(texts, vocab_size=120)


def test_save_load_reproduces_outputs_exactly(tmp_path):
    model = model_for("tiny", "model.task_head=unified")
    model.text_tokenizer = _tokenizer()
    model.save_pretrained(tmp_path / "ckpt", model.config)
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    loaded = OmniVec2.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config and loaded.tasks == model.tasks
    assert loaded.text_tokenizer.vocab_size == model.text_tokenizer.vocab_size
    with torch.no_grad():
        for key in ("image/denoise", "audio/digit", "text/language", "video/motion"):
            a, b = model.forward_single(batch(key)), loaded.forward_single(batch(key))
            assert all(torch.equal(a[k], b[k]) for k in a)
        pa = model.forward_pair(batch("image/digit"), batch("text/digit"))
        pb = loaded.forward_pair(batch("image/digit"), batch("text/digit"))
        assert torch.equal(pa[0], pb[0]) and torch.equal(pa[1], pb[1])
    model.text_tokenizer = None


def test_conv_stem_checkpoints_round_trip_and_older_ones_load_as_built(tmp_path):
    b = batch("video/digit")
    for trunk in ("strided", "pooled"):
        conv = model_for("tiny", *_stems("conv", trunk))
        conv.save_pretrained(tmp_path / trunk)
        loaded = OmniVec2.from_pretrained(tmp_path / trunk)
        assert loaded.config.model.stem == {"image": "conv", "audio": "conv", "video": "conv"}
        assert loaded.config.model.stem_trunk == trunk
        with torch.no_grad():
            assert torch.equal(loaded.forward_single(b)["digit"], conv.forward_single(b)["digit"])

    def older(model: OmniVec2, name: str, edit) -> OmniVec2:
        model.save_pretrained(tmp_path / name)
        meta = json.loads((tmp_path / name / "config.json").read_text())
        del meta["model"]["stem_trunk"]  # written before model.stem_trunk: the strided stem
        edit(meta["model"])
        (tmp_path / name / "config.json").write_text(json.dumps(meta))
        return OmniVec2.from_pretrained(tmp_path / name)

    linear = model_for("tiny", "model.stem.image=linear")
    old = older(linear, "old", lambda m: m.pop("stem"))  # before model.stem: linear patch projections
    assert old.config.model.stem == {"image": "linear", "audio": "linear", "video": "linear"}
    every = model_for("tiny", *_stems("conv"))  # model.stem=conv before model.stem_modalities: every signal
    old = older(every, "conv_all", lambda m: m.update(stem="conv"))
    assert old.config.model.stem == {"image": "conv", "audio": "conv", "video": "conv"}
    images = model_for("tiny")  # model.stem=both with model.stem_modalities=[image]
    old = older(images, "images", lambda m: m.update(stem="both", stem_modalities=["image"]))
    assert old.config.model.stem == {"image": "both", "audio": "linear", "video": "linear"}
    assert old.config.model.stem_trunk == "strided"
    with torch.no_grad():
        assert torch.equal(old.forward_single(b)["digit"], images.forward_single(b)["digit"])
    # a `small` checkpoint from before model.stem_trunk keeps its linear audio/video and 49-token images
    small = model_for(
        "small",
        "model.stem={audio: linear, video: linear}",
        "model.stem_trunk=strided",
        "model.patch_size=4",
        "model.video_patch=8",
    )
    old = older(small, "small", lambda m: m.update(stem="both", stem_modalities=["image"]))
    assert old.config.model.stem == {"image": "both", "audio": "linear", "video": "linear"}
    assert old.config.model.patch_size == 4 and old.config.model.stem_trunk == "strided"


def test_dense_refiner_starts_as_the_identity_and_corrects_from_the_input_at_full_resolution():
    model = model_for("tiny", "model.dense_refine=8", tasks=TASKS)
    assert list(model.refiners) == ["image/denoise"] and not model_for("tiny").refiners
    assert model_for("small").config.model.dense_refine > 0  # the CPU default has one (RECIPE.md)
    b = batch("image/denoise")
    with torch.no_grad():
        refined = model.forward_single(b)["denoise"]
        refiners, model.refiners = model.refiners, torch.nn.ModuleDict()
        plain = model.forward_single(b)["denoise"]
        model.refiners = refiners
    assert torch.equal(refined, plain)  # untrained: exactly the head's per-token pixels
    # built last on a forked RNG: a refiner changes no other weight's draw, nor what is drawn after
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("refiners.")}
    without = model_for("tiny", tasks=TASKS).state_dict()
    assert rest.keys() == without.keys() and all(torch.equal(rest[k], without[k]) for k in rest)
    torch.manual_seed(0)
    build_model(load_config(overrides=["model.preset=tiny", "model.dense_refine=8"]), TASKS)
    after = torch.rand(3)
    torch.manual_seed(0)
    build_model(load_config(overrides=["model.preset=tiny"]), TASKS)
    assert torch.equal(after, torch.rand(3))
    refiner = model.refiners["image/denoise"]
    torch.nn.init.normal_(refiner.net[-1].weight, std=0.1)
    coarse, x = torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)
    moved = x.clone()
    moved[:, :, 10, 12] += 1.0  # one input pixel
    with torch.no_grad():
        changed = (refiner(coarse, moved) - refiner(coarse, x)).abs().sum((0, 1)) > 0  # (28, 28)
    # three 3x3 convolutions: exactly the 7x7 neighbourhood of that pixel sees it, at full resolution
    expected = torch.zeros(28, 28, dtype=torch.bool)
    expected[7:14, 9:16] = True
    assert torch.equal(changed, expected)
    deeper = model_for("tiny", "model.dense_refine=8", "model.dense_refine_depth=5", tasks=TASKS)
    refiner5 = deeper.refiners["image/denoise"]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in refiner5.net) == 5
    torch.nn.init.normal_(refiner5.net[-1].weight, std=0.1)
    with torch.no_grad():
        changed = (refiner5(coarse, moved) - refiner5(coarse, x)).abs().sum((0, 1)) > 0
    expected[5:16, 7:18] = True  # five: the 11x11 neighbourhood
    assert torch.equal(changed, expected)
    with pytest.raises(ConfigError, match="dense_refine_depth"):
        load_config(overrides=["model.dense_refine_depth=1"])
    with pytest.raises(ValueError, match="needs the batch's input"):
        model._predict("image/denoise", torch.zeros(1, 49, 32), None, torch.zeros(49, 2))
    with pytest.raises(ValueError, match="on the prediction's grid"):
        refiner(coarse, x[:, :, :14])


def test_dense_refiner_round_trips_and_older_checkpoints_and_runs_load_without_one(tmp_path):
    model = model_for("tiny", "model.dense_refine=8", tasks=TASKS)
    torch.nn.init.normal_(model.refiners["image/denoise"].net[-1].weight, std=0.1)
    model.save_pretrained(tmp_path / "new")
    loaded = OmniVec2.from_pretrained(tmp_path / "new")
    b = batch("image/denoise")
    with torch.no_grad():
        assert torch.equal(loaded.forward_single(b)["denoise"], model.forward_single(b)["denoise"])
    plain = model_for("small", "model.dense_refine=0")  # a `small` model as built before the refiner
    plain.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    del meta["model"]["dense_refine"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    old = OmniVec2.from_pretrained(tmp_path / "old")  # the preset's refiner must not appear
    assert old.config.model.dense_refine == 0 and not old.refiners
    # a run's saved config (--resume, --init, evaluate) is upgraded the same way
    assert read_saved_config(tmp_path / "old" / "config.json")["model"]["dense_refine"] == 0
    # a refiner saved before model.dense_refine_depth had three convolutions, whatever the preset says now
    three = model_for("small", "model.dense_refine_depth=3")
    three.save_pretrained(tmp_path / "three")
    meta = json.loads((tmp_path / "three" / "config.json").read_text())
    del meta["model"]["dense_refine_depth"]
    (tmp_path / "three" / "config.json").write_text(json.dumps(meta))
    reloaded = OmniVec2.from_pretrained(tmp_path / "three")  # strict: the weights fit the network
    assert reloaded.config.model.dense_refine_depth == 3
    assert sum(isinstance(m, torch.nn.Conv2d) for m in reloaded.refiners["image/denoise"].net) == 3


def test_head_pool_reads_the_token_mean_or_the_cls_and_old_checkpoints_keep_cls(tmp_path):
    from workbench.model.heads import masked_mean

    model = model_for("tiny")
    head = model.heads["audio/digit"]
    b = batch("audio/digit", n=3)  # variable lengths: padding must stay out of the mean
    seen = {}
    hook = head.body.register_forward_hook(lambda _m, _i, out: seen.update(x=out))
    with torch.no_grad():
        logits = model.forward_single(b)["digit"]
        padding = model.tokenize(b)[0].padding
    hook.remove()
    assert padding is not None and padding.any()
    x = seen["x"]  # (B, 1 + N, head_dim): CLS first
    assert torch.allclose(logits, head.out(masked_mean(x[:, 1:], padding)), atol=1e-6)
    assert not torch.allclose(logits, head.out(x[:, 0]), atol=1e-3)
    # a checkpoint written before model.head_pool existed loads with the CLS read-out it was trained with
    cls_model = model_for("tiny", "model.head_pool=cls")
    cls_model.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    del meta["model"]["head_pool"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    loaded = OmniVec2.from_pretrained(tmp_path / "old")
    assert loaded.config.model.head_pool == "cls"
    with torch.no_grad():
        assert torch.equal(loaded.forward_single(b)["digit"], cls_model.forward_single(b)["digit"])


@pytest.mark.parametrize("scheme", ["xavier", "trunc_normal"])
def test_model_init_sets_every_transformer_linear_and_keeps_the_special_inits(scheme):
    import math

    from workbench.model.attention import Transformer

    model = model_for("tiny", f"model.init={scheme}", "model.moe_experts=2", "model.moe_every=1")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    in_transformers = {n for t_name, t in model.named_modules() if isinstance(t, Transformer)
                       for n, _ in t.named_modules(prefix=t_name)}  # fmt: skip
    checked = 0
    for name, m in linears:
        if name not in in_transformers or name.endswith("router"):
            continue
        fan_out, fan_in = m.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))  # xavier_uniform: U(-b, b), sd = b / sqrt(3)
        w = m.weight.detach()
        if scheme == "xavier":
            assert w.abs().max() <= bound + 1e-6, name
            assert abs(w.std().item() - bound / math.sqrt(3)) < 0.25 * bound / math.sqrt(3), name
        else:
            assert abs(w.std().item() - 0.02) < 0.006, name
        assert m.bias is None or not m.bias.any(), name
        checked += 1
    assert checked >= 20
    routers = [m for n, m in linears if n.endswith("router")]
    assert routers and all(r.weight.std() < 0.03 for r in routers)  # near-uniform routing either way
    fc = [m for m in model.f.fc if isinstance(m, torch.nn.Linear)]  # He init before ReLU, whatever the scheme
    assert fc[0].weight.std() > 0.15


def test_mismatched_checkpoints_are_refused(tmp_path):
    model = model_for("tiny")
    good = tmp_path / "good"
    model.save_pretrained(good)

    def variant(name: str, edit) -> str:
        d = tmp_path / name
        shutil.copytree(good, d)
        meta = json.loads((d / "config.json").read_text())
        edit(meta)
        (d / "config.json").write_text(json.dumps(meta))
        return d

    wider = variant("wider", lambda m: m["model"].update(dim=64))
    with pytest.raises(CheckpointError, match="shape"):
        OmniVec2.from_pretrained(wider)
    fewer = variant("fewer", lambda m: m.update(tasks=[t for t in m["tasks"] if t["modality"] != "video"]))
    with pytest.raises(CheckpointError, match="lacks"):
        OmniVec2.from_pretrained(fewer)
    alien = variant(
        "alien",
        lambda m: m["tasks"].append(
            {"modality": "smell", "name": "x", "kind": "classification", "labels": ["a"], "shape": []}
        ),
    )
    with pytest.raises(CheckpointError, match="smell"):
        OmniVec2.from_pretrained(alien)
    unified = variant("unified", lambda m: m["model"].update(tokenizer="unified"))
    with pytest.raises(CheckpointError, match="missing"):
        OmniVec2.from_pretrained(unified)
    with pytest.raises(CheckpointError, match="no head for task"):
        OmniVec2.from_pretrained(
            good, expect_tasks=[TaskSpec("image", "colour", "classification", ("r", "g"))]
        )
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        OmniVec2.from_pretrained(tmp_path)
    (good / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError):
        OmniVec2.from_pretrained(good)


def test_load_components_copies_backbone_not_heads_or_decoders(tmp_path):
    stage1 = model_for("tiny")
    stage1.save_pretrained(tmp_path / "s1")
    torch.manual_seed(1)
    later = build_model(stage1.config, TASKS)
    loaded = later.load_components(tmp_path / "s1")
    assert loaded and all(k.split(".")[0] in ("tokenizers", "f", "A", "g") for k in loaded)
    s1, s2 = stage1.state_dict(), later.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in loaded)
    assert not torch.equal(s1["decoders1.image.out.weight"], s2["decoders1.image.out.weight"])
    assert not torch.equal(s1["heads.image/digit.out.weight"], s2["heads.image/digit.out.weight"])
    wider = build_model(load_config(overrides=["model.preset=tiny", "model.dim=64"]), TASKS)
    with pytest.raises(CheckpointError, match="shape"):
        wider.load_components(tmp_path / "s1")


def test_text_tokenizer_must_fit_the_embedding():
    model = build_model(load_config(overrides=["model.preset=tiny", "model.text_vocab_size=10"]), TASKS)
    with pytest.raises(ConfigError, match="text_vocab_size"):
        model.text_tokenizer = _tokenizer()


# --------------------------------------------------------------------------------- capture, silencing
def test_capture_names_shapes_and_no_effect_on_outputs():
    model = model_for("tiny")
    a, b = batch("image/digit", 2), batch("audio/digit", 2, seed=1)
    with torch.no_grad():
        plain = model.forward_pair(a, b)
        with model.capture_attention() as maps:
            captured = model.forward_pair(a, b)
        after = model.forward_pair(a, b)
    for x, y in zip(plain, captured):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)  # explicit path == fused path
    assert len(maps) == len(dict(maps))
    Na, Nb = 49, model.patchers["audio"](b.x, b.lengths).values.shape[1]
    h = model.config.model.heads
    assert maps["f.0[i]"].shape == (2, h, Na, Na) and maps["f.0[j]"].shape == (2, h, Nb, Nb)
    assert maps["A.i<-j"].shape == (2, h, Na, Nb) and maps["A.j<-i"].shape == (2, h, Nb, Na)
    assert maps["g.0"].shape == (2, h, Na + Nb, Na + Nb)
    assert maps["A.back.i"].shape == (2, h, Na, Na) and maps["A.back.j"].shape == (2, h, Nb, Nb)
    assert maps["head.image/digit.0[i]"].shape == (2, model.config.model.head_heads, 1 + Na, 1 + Na)
    assert "head.audio/digit.0[j]" in maps
    # padded audio tokens receive no attention
    padding = model.patchers["audio"](b.x, b.lengths).padding
    assert (maps["A.i<-j"][1][:, :, padding[1]] == 0).all()
    assert all(torch.equal(x, y) for x, y in zip(plain, after))  # the fast path is back
    with torch.no_grad(), model.capture_attention() as single:
        model.forward_single(a)
    assert {"f.0", "g.0", "head.image/digit.0", "head.image/denoise.0"} <= set(single)
    assert not any(k.startswith("A.") for k in single)  # single stream: no cross-attention


def test_silencing_a_head_changes_only_that_head():
    model = model_for("tiny", "model.depth_f=2")
    b = batch("image/digit", 2)
    with torch.no_grad():
        plain = model.forward_single(b)
        with model.capture_attention(outputs=True) as ref:
            base = model.forward_single(b)
        with model.silence_heads([("f", 1, 0)]), model.capture_attention(outputs=True) as sil:
            silenced = model.forward_single(b)
        restored = model.forward_single(b)
        with model.silence_heads([("f", 1, 0)]):
            fast = model.forward_single(b)  # SDPA path with the head silenced
    torch.testing.assert_close(fast["digit"], silenced["digit"], atol=1e-5, rtol=0)
    out_ref, out_sil = ref.outputs["f.1"], sil.outputs["f.1"]
    assert (out_sil[:, 0] == 0).all() and not (out_ref[:, 0] == 0).all()
    assert torch.equal(out_sil[:, 1:], out_ref[:, 1:])  # the other head of that layer is identical
    assert torch.equal(sil["f.1"], ref["f.1"]) and torch.equal(sil["f.0"], ref["f.0"])  # maps unchanged
    assert torch.equal(sil.outputs["f.0"], ref.outputs["f.0"])  # earlier layer untouched
    assert not torch.equal(sil.outputs["g.0"], ref.outputs["g.0"])  # later layers see the change
    assert not torch.allclose(silenced["digit"], base["digit"])
    assert torch.equal(restored["digit"], plain["digit"])  # leaving the context restores every head
    with pytest.raises(ConfigError, match="no attention layer"), model.silence_heads([("f", 9, 0)]):
        pass
    with pytest.raises(ConfigError, match="heads"), model.silence_heads([("g", 0, 99)]):
        pass
    layout = model.attention_layout()
    assert layout["f"] == (2, 2) and layout["A"] == (2, 2) and layout["head.image/digit"] == (1, 2)


def test_capture_and_silencing_are_per_thread():
    """One shared model serving two threads: probing in one leaves the other's forward untouched."""
    model = model_for("tiny")
    mine, theirs = batch("image/digit", 2), batch("image/digit", 3, seed=4)
    out = {}

    def other_thread():
        with torch.no_grad():
            out["theirs"] = model.forward_single(theirs)["digit"]

    with torch.no_grad():
        plain = model.forward_single(theirs)["digit"]
        with model.silence_heads([("f", 0, 0), ("g", 0, 1)]), model.capture_attention() as maps:
            silenced = model.forward_single(mine)["digit"]
            worker = threading.Thread(target=other_thread)
            worker.start()
            worker.join()
    assert torch.equal(out["theirs"], plain)  # no silencing, fast path
    assert maps["f.0"].shape[0] == 2  # only this thread's forward was recorded
    assert torch.isfinite(silenced).all()


# --------------------------------------------------------------------------------- variants and CLI
@pytest.mark.parametrize("fusion", ["early", "late"])
def test_other_fusion_strategies_run(fusion):
    model = model_for("tiny", f"model.fusion={fusion}")
    assert model.A is None and "A" not in model.parameter_counts()
    with torch.no_grad():
        pa, pb = model.forward_pair(batch("text/digit"), batch("video/motion"))
        oa, ob = model.forward_masked_pair(batch("text/digit"), batch("video/motion"), 0.2, 0.8)
    assert pa.shape == (3, 10) and pb.shape == (3, 8) and torch.isfinite(oa.loss) and torch.isfinite(ob.loss)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.tokenizer=unified",),
        ("model.task_head=unified",),
        ("model.task_head=autoencoder",),
        ("model.tokenizer=unified", "model.task_head=autoencoder"),
    ],
)
def test_ablation_variants_run_every_task_end_to_end(overrides):
    model = model_for("tiny", *overrides)
    with torch.no_grad():
        for m in MODALITIES:
            b = batch(f"{m}/{MODALITIES[m].default_tasks[0].name}")
            out = model.forward_single(b)
            for name, pred in out.items():
                assert (
                    pred.shape == expected_shape(model.tasks[f"{m}/{name}"], 3) and torch.isfinite(pred).all()
                )
            assert torch.isfinite(model.forward_masked(b, 0.5).loss)
    if "model.tokenizer=unified" in overrides:
        assert list(dict(model.tokenizers.named_parameters())) == ["weight", "bias"]  # one shared projection


def test_unified_head_scores_shared_label_embeddings():
    model = model_for("tiny", "model.task_head=unified")
    head = model.heads
    assert head.label_index["image/digit"] == head.label_index["audio/digit"]  # "7" is one point for all
    assert len(head.label_names) == 10 + 5 + 8  # digits, languages, directions
    with torch.no_grad():
        head.label_embed[head.label_names.index("3")] = 0.0  # a zero embedding scores 0 in cosine space
        out = model.forward_single(batch("video/digit"))["digit"]
    assert torch.all(out[:, 3] == 0) and not torch.all(out == 0)


def test_autoencoder_heads_start_from_the_stage1_decoder():
    model = model_for("tiny", "model.task_head=autoencoder")
    model.init_heads_from_decoders()
    head, dec = model.heads["audio/language"], model.decoders1["audio"]
    assert torch.equal(head.body.blocks[0].attn.qkv.weight, dec.body.blocks[0].attn.qkv.weight)


def test_user_tasks_build_their_own_heads():
    tasks = [
        TaskSpec("image", "colour", "classification", ("red", "green", "blue")),
        TaskSpec("image", "upscale", "dense", shape=(1, 56, 56)),
        TaskSpec("audio", "pitch", "dense", shape=(3,)),
    ]
    model = model_for("tiny", tasks=tasks)
    assert model.modalities == ["image", "audio"] and model.token_numel["image/upscale"] == 64
    with torch.no_grad():
        out = model.forward_single(synthetic_batch(tasks[0], 2))
        audio = model.forward_single(synthetic_batch(tasks[2], 2, audio_seconds=0.3))
    assert (
        out["colour"].shape == (2, 3)
        and out["upscale"].shape == (2, 1, 56, 56)
        and audio["pitch"].shape == (2, 3)
    )
    with pytest.raises(ConfigError, match="no tokenizer"):
        model.forward_single(batch("text/digit"))


def test_too_long_audio_is_refused_not_truncated():
    model = model_for("tiny")
    n = int(model.config.model.max_audio_seconds * SAMPLE_RATE) + SAMPLE_RATE // 10
    with pytest.raises(MediaError, match="at most"):
        model.forward_single(
            Batch("audio", "digit", torch.zeros(1, n), torch.zeros(1).long(), torch.tensor([n]))
        )


def test_cli_model_prints_components_and_token_counts(capsys):
    from workbench.cli import main

    assert main(["model", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    counts = model_for("tiny").parameter_counts()
    for name in ("tokenizers", "f", "A", "g", "heads", "decoders1", "total"):
        assert name in out
    assert f"{counts['total']:,}" in out
    for m in MODALITIES:
        assert m in out
    assert main(["model", "--preset", "nope"]) == 2


# --------------------------------------------------------------------------------- text position shift
def test_text_shift_moves_each_phrase_in_training_only():
    """model.text_shift: in training a phrase's tokens carry the positions of a random start in [0, K]
    (token j of a phrase shifted by s has position j + s exactly); in eval every phrase starts at the
    middle of that range, K // 2; signals never move."""
    coords = torch.arange(5.0)[:, None]
    shifted = positions(coords, 32, torch.tensor([0, 3]))
    torch.testing.assert_close(shifted[0], sincos_embedding(coords, 32))
    torch.testing.assert_close(shifted[1], sincos_embedding(coords + 3, 32))

    model = model_for("tiny", "model.text_shift=6", "model.text_unk=0")  # positions only: no word dropout
    text, image = batch("text/digit", n=64), batch("image/digit")
    with torch.no_grad():
        _, still, _ = model.tokenize(text)
        model.train()
        torch.manual_seed(0)
        _, moved, _ = model.tokenize(text)
        _, image_train, _ = model.tokenize(image)
    model.eval()
    n = still.shape[1]
    grid = torch.arange(float(n))[:, None]
    content = still - sincos_embedding(grid + 3, still.shape[-1])  # eval: every phrase starts at 6 // 2
    candidates = positions(grid, still.shape[-1], torch.arange(7))  # (7, n, dim): every allowed start
    found = set()
    for row in range(64):  # recover each phrase's start from the positions it was given
        pe = moved[row] - content[row]
        match = [s for s in range(7) if torch.allclose(pe, candidates[s], atol=1e-5)]
        assert len(match) == 1, row
        found.add(match[0])
    assert found == set(range(7))  # every offset in [0, K] drawn, none outside
    with torch.no_grad():  # a passed generator alone decides the draw (what lets --resume replay it)
        model.train()
        _, g1, _ = model.tokenize(text, torch.Generator().manual_seed(5))
        torch.manual_seed(123)
        _, g2, _ = model.tokenize(text, torch.Generator().manual_seed(5))
        model.eval()
    torch.testing.assert_close(g1, g2)
    assert not torch.equal(g1, still)
    with torch.no_grad():
        _, image_eval, _ = model.tokenize(image)
        _, again, _ = model.tokenize(text)
    torch.testing.assert_close(image_train, image_eval)  # signals never move
    torch.testing.assert_close(again, still)  # eval: deterministic
    model.text_shift = 0  # off: no shift in eval either
    with torch.no_grad():
        _, unshifted, _ = model.tokenize(text)
    torch.testing.assert_close(unshifted, content + sincos_embedding(grid, still.shape[-1]))


# ------------------------------------------------------------------------- text vocabulary and [UNK]
def test_word_vocabulary_reads_an_unseen_word_as_one_unk_where_bpe_shatters_it():
    """The held-out phrasing "Zimmer Nummer 3": whole words give "[UNK] [UNK] 3"; BPE gives character
    pieces that also occur inside number words (text_tokenizer.py)."""
    from workbench.model.text_tokenizer import UNK_ID

    corpus = ["die Zahl 3", "die Zahl drei", "vier minus eins", "neun", "die Antwort ist sieben"] * 4
    words = TextTokenizer.train(corpus, vocab_size=100, kind="word")
    ids, lengths = words.encode(["Zimmer Nummer 3", "die Zahl drei"])
    assert lengths.tolist() == [3, 3]
    assert ids[0].tolist() == [UNK_ID, UNK_ID, words.tokenizer.token_to_id("3")]
    assert UNK_ID not in ids[1].tolist()
    pieces = TextTokenizer.train(corpus, vocab_size=100, kind="bpe").tokens("Zimmer Nummer 3")
    assert len(pieces) > 3 and "[UNK]" not in pieces[:2]
    with pytest.raises(ValueError, match="word' or 'bpe"):
        TextTokenizer.train(corpus, kind="chars")


def test_word_dropout_hides_words_behind_unk_in_training_only():
    """model.text_unk=p: in training each word id (never [PAD]/[CLS]/...) becomes [UNK] with probability
    p, decided by the passed generator alone; eval and signals are untouched."""
    from workbench.model.text_tokenizer import SPECIAL_TOKENS, UNK_ID

    model = model_for("tiny", "model.text_unk=0.3")
    text = batch("text/digit", n=64)
    p = model.patchers["text"](text.x, text.lengths)
    assert model._word_dropout("text", p, None) is p  # eval: nothing hidden
    model.train()
    try:
        first = model._word_dropout("text", p, torch.Generator().manual_seed(3))
        torch.manual_seed(99)
        again = model._word_dropout("text", p, torch.Generator().manual_seed(3))
        image = batch("image/digit")
        pi = model.patchers["image"](image.x)
        assert model._word_dropout("image", pi, torch.Generator()) is pi
    finally:
        model.eval()
    assert torch.equal(first.values, again.values)
    changed = first.values != p.values
    assert (first.values[changed] == UNK_ID).all()  # hidden words become [UNK] ...
    assert (p.values[changed] >= len(SPECIAL_TOKENS)).all()  # ... and only words are ever hidden
    words = p.values >= len(SPECIAL_TOKENS)
    share = changed.sum().item() / words.sum().item()
    assert 0.2 < share < 0.4, share  # ~0.3 of ~600 words


def test_zero_fusion_starts_cross_attention_as_the_identity_and_still_learns():
    from workbench.modalities import default_tasks
    from workbench.model.synthetic import synthetic_batch

    torch.manual_seed(0)
    model = model_for("tiny", "model.zero_fusion=true", tasks=TASKS)  # a fresh copy: this test trains it
    w = model.config.model.fc_dims[-1]
    x, ctx = torch.randn(2, 5, w), torch.randn(2, 7, w)
    assert torch.equal(model.A.fuse(x, ctx), x)  # u_i = f_i + 0
    assert torch.equal(model.A.back(x, torch.randn(2, 7, model.config.model.dim)), x)
    assert not torch.equal(model_for("tiny").A.fuse(x, ctx), x)  # the default init mixes from the start
    tasks = {t.key: t for t in default_tasks()}
    a, b = synthetic_batch(tasks["image/digit"], 4), synthetic_batch(tasks["audio/digit"], 4, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # step 1 moves the zeroed projections, step 2 then reaches q, k and v behind them
        opt.zero_grad()
        pa, pb = model.forward_pair(a, b)
        (model.task_loss("image/digit", pa, a.y) + model.task_loss("audio/digit", pb, b.y)).backward()
        opt.step()
    for name, p in model.A.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
