"""The embedded benchmark: tasks, the batch contract, loaders, pairing, the cache and the CLI.

Built once per session at ``data.scale=0.05`` (every split, voice group and template kept; ~2 s).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time

import pytest
import torch
from torch.utils.data import default_collate

from workbench.batch import Batch
from workbench.cli import main
from workbench.config import DataConfig, load_config
from workbench.data import (
    aligned_pairs,
    describe,
    format_table,
    load_benchmark,
    make_loader,
    make_paired_loader,
)
from workbench.data import cache as cache_mod
from workbench.data.benchmark import TaskData, TaskDataset
from workbench.data.digits import render_clips
from workbench.errors import ConfigError, WorkbenchError
from workbench.modalities import DIRECTIONS, IMAGE_SIZE, VIDEO_FRAMES, VIDEO_SIZE, default_tasks
from workbench.model.text_tokenizer import TextTokenizer

SCALE = 0.05


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def bench(root):
    return load_benchmark(DataConfig(scale=SCALE), seed=0, root=root)


@pytest.fixture(scope="module")
def tokenizer(bench):
    return TextTokenizer.train(bench.text_corpus("train"), vocab_size=300)


def test_tasks_follow_the_registry(bench, root):
    assert [t.key for t in bench.tasks] == [t.key for t in default_tasks()]
    assert len(bench.tasks) == 8 and bench.modalities == ["image", "audio", "text", "video"]
    some = load_benchmark(DataConfig(scale=SCALE, modalities=["video", "text"]), seed=0, root=root)
    assert [t.key for t in some.tasks] == ["text/digit", "text/language", "video/digit", "video/motion"]
    with pytest.raises(ConfigError, match="no task 'audio/digit'"):
        some.dataset("audio", "digit", "train")
    with pytest.raises(ConfigError, match="split"):
        bench.dataset("image", "digit", "training")


def test_every_task_batch_keeps_the_tensor_contract(bench, tokenizer):
    """Shapes, dtypes, ranges, lengths and digits of one batch of every (modality, task, split)."""
    for spec in bench.tasks:
        for split in ("train", "val", "test"):
            ds = bench.dataset(spec.modality, spec.name, split)
            assert len(ds) > 0
            batch = next(iter(make_loader(ds, 16, shuffle=True, seed=0, text_tokenizer=tokenizer)))
            assert isinstance(batch, Batch) and batch.key == spec.key and len(batch) == min(16, len(ds))
            b = len(batch)
            assert batch.digit is not None and batch.digit.shape == (b,) and 0 <= batch.digit.min() <= 9
            if spec.kind == "classification":
                assert batch.y.dtype == torch.int64 and batch.y.shape == (b,)
                assert int(batch.y.min()) >= 0 and int(batch.y.max()) < spec.num_classes
            else:
                assert batch.y.dtype == torch.float32 and batch.y.shape == (b, *spec.shape)
            x = batch.x
            if spec.modality == "image":
                assert x.shape == (b, 1, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
            elif spec.modality == "video":
                assert x.shape == (b, VIDEO_FRAMES, 1, VIDEO_SIZE, VIDEO_SIZE) and x.dtype == torch.float32
            elif spec.modality == "audio":
                assert x.dtype == torch.float32 and x.dim() == 2 and batch.lengths.shape == (b,)
                assert int(batch.lengths.max()) == x.shape[1]
                for row, n in zip(x, batch.lengths):  # zero padding on the right only
                    assert float(row[n:].abs().sum()) == 0 and float(row[:n].abs().max()) > 0.05
            else:
                assert x.dtype == torch.int64 and batch.lengths.shape == (b,) and int(x.min()) >= 0
                assert all(int((row != 0).sum()) == n for row, n in zip(x, batch.lengths))
            if spec.modality in ("image", "video"):
                assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.5


def _same_batch(a: Batch, b: Batch) -> None:
    assert a.key == b.key
    for name in ("x", "y", "lengths", "digit"):
        u, v = getattr(a, name), getattr(b, name)
        assert (u is None) == (v is None), name
        assert u is None or (u.dtype == v.dtype and torch.equal(u, v)), f"{a.key}: {name} differs"


def test_a_batch_read_at_once_equals_its_items_collated_one_by_one(bench, tokenizer):
    """A loader fetches a batch's Rows (``__getitems__``) and reads each column once; that must give
    exactly the batch that collating the items one by one gives, for every input kind and target."""
    order = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))
    for spec in bench.tasks:
        ds = bench.dataset(spec.modality, spec.name, "train")
        indices = order[order < len(ds)][:13].tolist()
        loader = make_loader(ds, 13, shuffle=False, seed=0, text_tokenizer=tokenizer)
        rows = ds.__getitems__(indices)
        x, y, digit = rows[5]  # the items stay readable one by one
        x5, y5, digit5 = ds[indices[5]]
        assert len(rows) == 13 and torch.equal(y, y5) and torch.equal(digit, digit5)
        assert x == x5 if isinstance(x, str) else torch.equal(x, x5)
        _same_batch(loader.collate_fn(rows), loader.collate_fn([ds[i] for i in indices]))
        # and the DataLoader itself takes that path: its first batch is items 0-12 collated one by one
        _same_batch(next(iter(loader)), loader.collate_fn([ds[i] for i in range(13)]))
        if ds.input_kind == "dense":  # a collate function of one's own still sees the items
            assert torch.equal(default_collate(rows)[0], default_collate([ds[i] for i in indices])[0])
    audio, text = bench.dataset("audio", "digit", "val"), bench.dataset("text", "digit", "val")
    paired = make_paired_loader(audio, text, 9, shuffle=True, seed=3, text_tokenizer=tokenizer)
    fast = paired.collate_fn(paired.dataset.__getitems__([4, 0, 7]))
    slow = paired.collate_fn([paired.dataset[i] for i in (4, 0, 7)])
    for a, b in zip(fast, slow):
        _same_batch(a, b)


def test_denoise_pairs_a_corrupted_input_with_the_clean_digit(bench):
    digit, denoise = bench.dataset("image", "digit", "train"), bench.dataset("image", "denoise", "train")
    for i in range(0, len(digit), 37):
        clean, label, _ = digit[i]
        noisy, target, d = denoise[i]
        assert torch.equal(target, clean) and int(d) == int(label)
        mse = float((noisy - clean).pow(2).mean())
        assert 1e-3 < mse < 0.2 and 10 * math.log10(1 / mse) < 30  # really corrupted (PSNR < 30 dB)


def test_motion_label_is_the_direction_of_travel(bench):
    """For every clip, the centre of mass moves in the labelled direction, by 1.5-2.2 px per frame."""
    idx = torch.arange(VIDEO_SIZE, dtype=torch.float32)
    for split in ("train", "test"):
        ds = bench.dataset("video", "motion", split)
        for i in range(len(ds)):
            clip, label, _ = ds[i]
            mass = clip[:, 0].sum((1, 2))
            assert (
                float(clip[:, 0, [0, -1]].max()) < 0.3 and float(clip[:, 0, :, [0, -1]].max()) < 0.3
            )  # in view
            cx = (clip[:, 0].sum(1) * idx).sum(1) / mass
            cy = (clip[:, 0].sum(2) * idx).sum(1) / mass
            dx, dy = float(cx[-1] - cx[0]), float(cy[-1] - cy[0])
            angle = math.degrees(math.atan2(-dy, dx)) % 360  # screen y points down
            assert DIRECTIONS[round(angle / 45) % 8] == DIRECTIONS[int(label)]
            assert 1.3 * 7 < math.hypot(dx, dy) < 2.4 * 7


def test_loader_order_depends_only_on_the_seed(bench):
    ds = bench.dataset("image", "digit", "train")

    def order(seed: int) -> torch.Tensor:
        torch.manual_seed(1234 + seed)  # the global RNG must not matter
        return torch.cat([b.digit for b in make_loader(ds, 32, shuffle=True, seed=seed)])

    first = [b.x for b in make_loader(ds, 32, shuffle=True, seed=3)]
    torch.rand(10)
    again = [b.x for b in make_loader(ds, 32, shuffle=True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(order(3), order(4))
    unshuffled = torch.cat([b.digit for b in make_loader(ds, 50, shuffle=False, seed=0)])
    assert torch.equal(unshuffled, ds.digits)
    assert len(list(make_loader(ds, 64, shuffle=True, seed=0, drop_last=True))) == len(ds) // 64
    video = bench.dataset("video", "digit", "train")  # made from the same images, in another order
    same_row = video.column("source_id") == bench.dataset("image", "digit", "train").column("source_id")
    assert float(same_row.float().mean()) < 0.1  # even equal permutations do not pair the two streams
    assert not torch.equal(next(iter(make_loader(ds, 64, shuffle=True, seed=0))).digit,
                           next(iter(make_loader(video, 64, shuffle=True, seed=0))).digit)  # fmt: skip


def test_text_needs_the_tokenizer(bench, tokenizer):
    ds = bench.dataset("text", "language", "val")
    with pytest.raises(ValueError, match="text_tokenizer"):
        make_loader(ds, 8, shuffle=False, seed=0)
    corpus = bench.text_corpus("train")
    assert len(corpus) == len(set(corpus)) == len(bench.dataset("text", "digit", "train"))
    assert not set(corpus) & set(bench.text_corpus("test"))


def test_label_aligned_pairing(bench, tokenizer):
    image, audio = bench.dataset("image", "digit", "train"), bench.dataset("audio", "language", "train")
    partner = aligned_pairs(image, audio, seed=0)
    assert partner.shape == (len(image),)
    assert torch.equal(audio.digits[partner], image.digits)
    per_digit = torch.bincount(partner, minlength=len(audio))
    assert int(per_digit.max()) - int(per_digit.min()) <= 1 or len(image) < len(audio)  # B used evenly
    assert torch.equal(partner, aligned_pairs(image, audio, seed=0))
    loader = make_paired_loader(audio, bench.dataset("text", "digit", "train"), 16, shuffle=True, seed=1,
                                text_tokenizer=tokenizer)  # fmt: skip
    for a, b in loader:
        assert a.key == "audio/language" and b.key == "text/digit" and torch.equal(a.digit, b.digit)
    zeros_only = TaskData(image.spec, image.data.x, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                          torch.zeros(3, dtype=torch.uint8))  # fmt: skip
    with pytest.raises(ConfigError, match="no sample of digit 1"):
        aligned_pairs(image, TaskDataset(zeros_only, "train"), seed=0)
    unknown = TaskData(image.spec, image.data.x, torch.zeros(3, dtype=torch.long), torch.full((3,), -1),
                       torch.zeros(3, dtype=torch.uint8))  # fmt: skip
    with pytest.raises(ConfigError, match="does not know the digit"):
        aligned_pairs(image, TaskDataset(unknown, "train"), seed=0)


def test_describe_counts(bench):
    desc = describe(bench)
    assert set(desc["tasks"]) == {t.key for t in bench.tasks}
    for key, info in desc["tasks"].items():
        m, t = key.split("/")
        for split, c in info["splits"].items():
            assert c["total"] == len(bench.dataset(m, t, split)) == sum(c["per_class"].values())
    image = desc["tasks"]["image/digit"]["splits"]
    assert image["train"]["per_class"] == {str(d): 20 for d in range(10)}  # stratified at scale 0.05
    assert set(desc["tasks"]["video/motion"]["splits"]["train"]["per_class"]) == set(DIRECTIONS)
    table = format_table(desc)
    assert "audio     language  test" in table and "en:" in table and len(table.splitlines()) == 2 + 24


def test_cli_build_and_describe(root, capsys):
    assert main(["data", "build", "--root", str(root), f"data.scale={SCALE}"]) == 0
    assert "8 tasks" in capsys.readouterr().out
    assert main(["data", "describe", "--json", "--root", str(root), f"data.scale={SCALE}"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["tasks"]["text/language"]["splits"]["test"]["total"] > 0
    assert main(["data", "describe", "--root", str(root), "data.scale=5"]) == 2
    assert "data.scale" in capsys.readouterr().err


def test_cache_is_deterministic_versioned_and_fast(root, tmp_path):
    cfg = DataConfig(scale=SCALE)
    other = load_benchmark(cfg, seed=0, root=tmp_path / "again")
    first = cache_mod.entry_dir(root, "digits", {}).parent / os.path.basename(other.meta["cache"])
    for name in ("image", "audio", "video"):  # a fresh build in another place: bit-identical
        a = cache_mod.load_tensors(first / f"{name}.safetensors")
        b = cache_mod.load_tensors(tmp_path / "again" / first.name / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (first / "text.json").read_bytes() == (tmp_path / "again" / first.name / "text.json").read_bytes()
    t0 = time.perf_counter()
    load_benchmark(cfg, seed=0, root=root)
    assert time.perf_counter() - t0 < 2.0
    seed1 = load_benchmark(cfg, seed=1, root=tmp_path / "again")
    assert seed1.meta["cache"] != other.meta["cache"]  # the key includes the seed
    test0, test1 = (b.dataset("image", "digit", "test").column("source_id") for b in (other, seed1))
    assert not torch.equal(test0, test1)  # ... and the seed changes the split


def test_cache_writes_atomically(tmp_path):
    def broken(out):
        (out / "image.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # killed half-way

    with pytest.raises(KeyboardInterrupt):
        cache_mod.ensure(tmp_path, "digits", {"p": 1}, broken)
    assert not cache_mod.is_built(cache_mod.entry_dir(tmp_path, "digits", {"p": 1}))
    assert list(tmp_path.iterdir()) == []  # neither a target nor a temporary directory is left
    stale = tmp_path / ".tmp-999999999-abcd-digits"  # left by a process that was SIGKILLed
    stale.mkdir()
    path = cache_mod.ensure(tmp_path, "digits", {"p": 1}, lambda out: {"ok": True})
    assert cache_mod.is_built(path) and not stale.exists()
    assert cache_mod.read_json(path / "meta.json")["ok"] is True
    calls = []
    cache_mod.ensure(tmp_path, "digits", {"p": 1}, lambda out: calls.append(1) or {})
    assert calls == []  # built once, then reused
    cache_mod.ensure(tmp_path, "digits", {"p": 1}, lambda out: calls.append(1) or {}, force=True)
    assert calls == [1]


def test_render_clips_is_exact_for_integer_motion():
    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    img[0, 10:18, 10:18] = 255
    clip = render_clips(img, torch.tensor([6]), torch.tensor([2.0]), torch.tensor([[4.0, 0.0]]))[0]  # south
    rows = [torch.nonzero(f.sum(1) > 0).flatten() for f in clip]
    assert all(int(b[0]) - int(a[0]) == 2 for a, b in itertools.pairwise(rows))


def test_config_key_and_errors():
    cfg = load_config(overrides=["data.scale=0.5"])
    assert cfg.data.scale == 0.5
    with pytest.raises(WorkbenchError, match=r"data\.scale"):
        load_config(overrides=["data.scale=0"])
