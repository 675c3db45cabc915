"""No leakage between splits: proved on a built benchmark (tracking provenance columns) and on the
full-size split functions (pure, cheap to evaluate at scale 1)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from workbench.config import DataConfig
from workbench.data import load_benchmark, phrases, speech
from workbench.data.digits import (
    IMAGE_SPLIT,
    SPLITS,
    load_mnist_5k,
    plan_clips,
    render_clips,
    split_images,
    split_voices,
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return load_benchmark(DataConfig(scale=0.05), seed=7, root=tmp_path_factory.mktemp("cache"))


def _hashes(x: torch.Tensor) -> set[str]:
    return {hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in x}


def test_image_splits_are_disjoint_pixel_arrays(bench):
    rows = {s: bench.dataset("image", "digit", s) for s in SPLITS}
    pixels = {s: _hashes(torch.stack([ds.data.x.data[int(r)] for r in ds.rows])) for s, ds in rows.items()}
    ids = {s: set(ds.column("source_id").tolist()) for s, ds in rows.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not pixels[a] & pixels[b] and not ids[a] & ids[b]


def test_full_size_image_split_is_stratified_and_disjoint():
    px, labels = load_mnist_5k()
    ids = split_images(labels, seed=0, scale=1.0)
    assert [len(ids[s]) for s in SPLITS] == list(IMAGE_SPLIT)
    for s in SPLITS:
        assert np.bincount(labels[ids[s]], minlength=10).tolist() == [IMAGE_SPLIT[SPLITS.index(s)] // 10] * 10
    hashed = {s: _hashes(torch.from_numpy(px[ids[s]])) for s in SPLITS}
    assert sum(len(h) for h in hashed.values()) == len(set().union(*hashed.values())) == 5000


def test_video_clips_use_only_their_own_split_images(bench):
    """Track source ids, and re-render each test clip from its source image: the frames match exactly."""
    image_ids = {s: set(bench.dataset("image", "digit", s).column("source_id").tolist()) for s in SPLITS}
    px, labels = load_mnist_5k()
    for si, split in enumerate(SPLITS):
        video = bench.dataset("video", "digit", split)
        src = video.column("source_id")
        assert set(src.tolist()) <= image_ids[split]
        assert torch.equal(video.labels, torch.from_numpy(labels[src.numpy()]))
        if split == "test":
            motion, speed, start = plan_clips(len(src), 7, si)
            clips = render_clips(torch.from_numpy(px[src.numpy()]), torch.from_numpy(motion), torch.from_numpy(speed),
                                 torch.from_numpy(start))  # fmt: skip
            stored = torch.stack([video.data.x.data[int(r)] for r in video.rows])
            assert torch.equal(clips, stored)


def test_audio_test_voices_are_never_heard_in_training(bench):
    voices = {s: set(bench.dataset("audio", "digit", s).column("voice").tolist()) for s in SPLITS}
    assert voices["train"] and voices["val"] and voices["test"]
    assert not voices["train"] & voices["test"] and not voices["train"] & voices["val"]
    assert not voices["val"] & voices["test"]
    names = [v for v, _ in speech.VOICE_VARIANTS]
    meta_voices = {s: {names.index(v) for v in vs} for s, vs in split_voices(7, 0.05).items()}
    assert voices == meta_voices
    audio = bench.dataset("audio", "digit", "test")  # and the waveforms themselves are not shared
    train = bench.dataset("audio", "digit", "train")
    assert not _hashes_of_waves(audio) & _hashes_of_waves(train)


def _hashes_of_waves(ds) -> set[str]:
    return {hashlib.sha1(ds[i][0].numpy().tobytes()).hexdigest() for i in range(len(ds))}


def test_full_size_voice_split():
    gender = dict(speech.VOICE_VARIANTS)
    for seed in range(3):
        voices = split_voices(seed, 1.0)
        assert [len(voices[s]) for s in SPLITS] == [24, 8, 8]
        assert sorted(v for vs in voices.values() for v in vs) == sorted(gender)  # each voice once
        for s in SPLITS:
            assert {gender[v] for v in voices[s]} == {"female", "male"}


def test_text_test_templates_are_never_seen_in_training(bench):
    templates = {s: set(bench.dataset("text", "digit", s).column("template").tolist()) for s in SPLITS}
    assert not templates["train"] & templates["test"] and not templates["train"] & templates["val"]
    assert not templates["val"] & templates["test"]
    texts = {s: set(bench.text_corpus(s)) for s in SPLITS}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["val"]


def test_full_size_text_split():
    items = phrases.build_texts(seed=0, scale=1.0)
    by_split = {s: [it for it in items if it["split"] == s] for s in SPLITS}
    tmpl = {s: {it["template"] for it in v} for s, v in by_split.items()}
    assert (
        not tmpl["train"] & tmpl["test"]
        and not tmpl["train"] & tmpl["val"]
        and not tmpl["val"] & tmpl["test"]
    )
    kinds = {t.name: t.kind for t in phrases.TEMPLATES}
    assert {kinds[t] for t in tmpl["test"]} == {"word", "arith"}  # test sees both kinds of phrasing
    for s in SPLITS:
        assert {it["language"] for it in by_split[s]} == set(phrases.LANGUAGES)
        assert {it["digit"] for it in by_split[s]} == set(range(10))
    strings = [it["text"].lower() for it in items]
    assert len(strings) == len(set(strings))  # one label per string: "six" (en/fr) is gone
    assert "six" not in strings and "uno" not in strings and "sieben" in strings


@pytest.mark.parametrize("seed", range(8))
def test_every_held_out_template_has_a_training_sibling_of_its_family(seed):
    """A val/test phrasing is new, but what it computes (and how its operands are written) is taught
    by another template in training; templates whose family has no sibling (before, after, half)
    always train."""
    family = {t.name: t.family for t in phrases.TEMPLATES}
    split = phrases.split_templates(seed)
    trained = {family[name] for name in split["train"]}
    for s in ("val", "test"):
        assert {family[name] for name in split[s]} <= trained, (s, split)
    singletons = {f for f in family.values() if list(family.values()).count(f) == 1}
    assert {name for name in family if family[name] in singletons} <= set(split["train"])
    assert sorted(name for names in split.values() for name in names) == sorted(family)  # each once


def test_arithmetic_phrases_mean_their_digit():
    en = {it["text"]: it["digit"] for it in phrases.build_texts(0, 1.0) if it["language"] == "en"}
    words = {phrases.word(n, "en"): n for n in range(100)}
    for text, digit in en.items():
        text = text.removeprefix("what is ").removesuffix("?")
        parts = text.split()
        if len(parts) == 3 and parts[1] in ("plus", "minus", "times"):
            a, b = words[parts[0]], words[parts[2]]
            assert {"plus": a + b, "minus": a - b, "times": a * b}[parts[1]] == digit
        if "divided by" in text:
            a, b = (words[w.strip()] for w in text.split("divided by"))
            assert a == digit * b
        if text.startswith("take "):  # "take B from A" = A - B
            b, a = (words[w.strip()] for w in text[len("take ") :].split(" from "))
            assert a - b == digit
        if text.startswith("split "):  # "split A into B equal parts" = A / B
            a, b = (words[w.strip()] for w in text[len("split ") : -len(" equal parts")].split(" into "))
            assert a == digit * b
    assert any(t.startswith("take ") for t in en) and any(t.startswith("split ") for t in en)


@pytest.mark.parametrize("seed", range(4))
def test_held_out_arithmetic_asks_facts_that_training_taught_in_another_frame(seed):
    """ "what is nine minus four?" is tested only after "nine minus four" trained: the operation's
    word and the operand pair were seen; only the frame is new (no guessing what "minus" means)."""
    family = {t.name: t.family for t in phrases.TEMPLATES}
    kind = {t.name: t.kind for t in phrases.TEMPLATES}
    items = phrases.build_texts(seed, 1.0)

    def fact(it):  # the frame stripped: "what is nine minus four?" -> "nine minus four"
        return family[it["template"]], it["text"].lower().removeprefix("what is ").removesuffix("?")

    taught = {fact(it) for it in items if it["split"] == "train" and it["language"] == "en"}
    held = [it for it in items if it["split"] != "train" and kind[it["template"]] == "arith"]
    held_en = [it for it in held if it["language"] == "en"]
    assert held_en and {it["split"] for it in held} == {"val", "test"}
    assert all(fact(it) in taught for it in held_en), [it["text"] for it in held_en if fact(it) not in taught]
    trained = {w for it in items if it["split"] == "train" for w in it["text"].lower().split()}
    for it in held:  # every word of a held-out arithmetic phrase occurs in training, in every language
        assert set(it["text"].lower().split()) <= trained, it
