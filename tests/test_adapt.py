"""Adaptation to an unseen dataset (paper 4.2): the subset, the reference features, the command.

Properties: the two layers train on a stratified, seeded fraction of the new dataset's training rows only
(never a held-out speaker); the front-end reference reads a clip the same alone or beside longer clips,
and an image as its standardised pixels; the untrained reference is the checkpoint's architecture with
fresh, seeded weights; the network's readout holds the paper's last-layer embedding and, at every depth,
skips padding; real FSDD recordings are learned well above chance; bad arguments exit 2. The
trained network against its untrained twin is in test_train.py, beside the trained checkpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workbench.adapt import _fresh_like, _subset, input_features, load_new_dataset, network_features
from workbench.batch import Batch
from workbench.cli import main
from workbench.config import DataConfig, load_config
from workbench.data.benchmark import TaskDataset
from workbench.errors import ConfigError
from workbench.modalities import default_tasks
from workbench.model import OmniVec2, build_model


@pytest.fixture(scope="module")
def fsdd_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def fsdd(fsdd_dir, fsdd_cache):
    return load_new_dataset("fsdd", fsdd_dir, DataConfig(cache_dir=str(fsdd_cache)), seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained `tiny` checkpoint: enough for the front-end and fresh-weight references."""
    torch.manual_seed(0)
    model = build_model(load_config(overrides=["model.preset=tiny"]), default_tasks())
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "checkpoint")


def test_the_subset_is_a_stratified_seeded_fraction_of_the_training_rows(fsdd):
    train, test = TaskDataset(fsdd, "train"), TaskDataset(fsdd, "test")
    held_out = set(test.column("speaker").tolist())
    sub = _subset(train, 0.1, seed=0)
    assert set(sub.rows.tolist()) <= set(train.rows.tolist())  # training rows only
    assert not held_out & set(sub.column("speaker").tolist())  # the test speaker is never trained on
    counts = np.bincount(train.labels.numpy(), minlength=10)
    assert np.bincount(sub.labels.numpy(), minlength=10).tolist() == [round(c * 0.1) for c in counts]
    assert torch.equal(_subset(train, 0.1, seed=0).rows, sub.rows)
    assert not torch.equal(_subset(train, 0.1, seed=1).rows, sub.rows)


def test_input_features_read_a_clip_the_same_beside_longer_clips(checkpoint, fsdd):
    model = OmniVec2.from_pretrained(checkpoint)
    waves = [fsdd.x.get(i) for i in range(3)]  # ragged real recordings
    lengths = torch.tensor([len(w) for w in waves])
    assert len(set(lengths.tolist())) == 3
    batch = torch.zeros(3, int(lengths.max()))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    together = input_features(
        model, Batch("audio", "digit", batch, torch.zeros(3, dtype=torch.long), lengths)
    )
    for i, w in enumerate(waves):
        alone = input_features(model, Batch("audio", "digit", w[None], torch.zeros(1, dtype=torch.long),
                                            lengths[i : i + 1]))  # fmt: skip
        torch.testing.assert_close(together[i], alone[0], rtol=1e-4, atol=1e-4)
    n_mels = model.config.model.n_mels
    assert together.shape[1] == 2 * n_mels  # mean and spread of every mel bin
    images = torch.rand(2, 1, 28, 28)
    pixels = input_features(model, Batch("image", "digit", images, torch.zeros(2, dtype=torch.long)))
    mean, std = model.config.model.image_norm
    expected = ((images - mean) / std).flatten(1)
    torch.testing.assert_close(pixels.sort(1).values, expected.sort(1).values)  # the same pixels, patch order


def test_the_network_readout_ends_with_the_last_layer_and_ignores_padding(checkpoint, fsdd):
    model = OmniVec2.from_pretrained(checkpoint).eval()
    waves = [fsdd.x.get(i) for i in (3, 4)]
    lengths = torch.tensor([len(w) for w in waves])
    assert lengths[0] != lengths[1]
    batch = torch.zeros(2, int(lengths.max()))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    b = Batch("audio", "digit", batch, torch.zeros(2, dtype=torch.long), lengths)
    with torch.no_grad():
        together, last = network_features(model, b), model.features(b)
        width = last.shape[1]
        assert together.shape == (2, 3 * width)
        torch.testing.assert_close(together[:, 2 * width :], last)  # the paper's embedding is the last third
        for i, w in enumerate(waves):  # every depth's mean skips the padding of the shorter clip
            alone = network_features(
                model, Batch("audio", "digit", w[None], torch.zeros(1, dtype=torch.long))
            )
            torch.testing.assert_close(together[i], alone[0], rtol=1e-4, atol=1e-4)


def test_the_untrained_reference_is_the_same_architecture_with_fresh_seeded_weights(checkpoint):
    model = OmniVec2.from_pretrained(checkpoint)
    a, b, c = _fresh_like(model, 0), _fresh_like(model, 0), _fresh_like(model, 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == model.state_dict().keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert not any(p.requires_grad for p in a.parameters())


def test_adapt_learns_real_recordings_and_refuses_bad_arguments(checkpoint, fsdd_dir, fsdd_cache, tmp_path,
                                                                 capsys, monkeypatch):  # fmt: skip
    monkeypatch.setenv("WORKBENCH_CACHE", str(fsdd_cache))  # the recordings decoded once for the module
    out = tmp_path / "adapt.json"
    args = ["adapt", "--checkpoint", str(checkpoint), "--dataset", "fsdd", "--dir", str(fsdd_dir)]
    assert main([*args, "--features", "input", "--epochs", "50", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["features"] == "input" and result["task"] == "audio/digit"
    settings = {"checkpoint": str(checkpoint.resolve()), "directory": str(fsdd_dir.resolve()), "seed": 0,
                "epochs": 50, "fraction": 0.1}  # fmt: skip
    assert settings.items() <= result.items() and result["overrides"] == []  # how to reproduce it
    assert result["train_samples"] == 140 and result["test_samples"] == 500  # 10% of 3 speakers; the 4th
    assert result["accuracy"] > 0.18, result  # chance is 0.10; measured 0.26-0.29 over seeds 0-2
    assert "input features): accuracy" in capsys.readouterr().out
    for bad, message in ((["--epochs", "0"], "epochs=0 must be at least 1"),
                         (["--fraction", "1.5"], "fraction=1.5 must be in (0, 1]")):  # fmt: skip
        assert main([*args, *bad]) == 2
        assert message in capsys.readouterr().err
    # another held-out speaker through a data override, recorded in the JSON; nothing else may be overridden
    george = "data.fsdd_holdout_speakers=[george]"
    assert main([*args, "--features", "input", "--epochs", "5", "--json", str(out), george]) == 0
    result = json.loads(out.read_text())
    assert result["overrides"] == [george] and result["test_samples"] == 500
    assert main([*args, "model.preset=small"]) == 2
    assert "adapt takes data.* overrides only" in capsys.readouterr().err
    idx = ["adapt", "--checkpoint", str(checkpoint), "--dataset", "idx", "--dir", str(tmp_path)]
    assert main(idx) == 2
    assert "has no train-images/train-labels IDX pair" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="text is token ids"):
        input_features(OmniVec2.from_pretrained(checkpoint),
                       Batch("text", "digit", torch.zeros(1, 3, dtype=torch.long), torch.zeros(1)))  # fmt: skip


def test_uci_digits_are_drawn_as_mnist_and_adapt_reads_them_without_a_directory(checkpoint, tmp_path, capsys):
    from workbench.data.sources import UCI_TRAIN, load_uci_digits

    table = load_uci_digits(seed=0)
    x = table.x.data.reshape(-1, 28, 28)  # the stored uint8 pixels
    assert len(table.y) == 1797 and x.dtype == torch.uint8 and table.spec.num_classes == 10
    assert int(x.max()) == 255 and not x[:, :4].any() and not x[:, -4:].any() and not x[:, :, :4].any()
    split = table.split.numpy()
    assert (split[:UCI_TRAIN] != 2).all() and (split[UCI_TRAIN:] == 2).all()  # the first 1,400 train
    val = np.flatnonzero(split == 1)
    assert len(val) == sum(round(c * 0.1) for c in np.bincount(table.y[:UCI_TRAIN].numpy()))  # stratified 10%
    assert not np.array_equal(np.flatnonzero(load_uci_digits(seed=1).split.numpy() == 1), val)
    out = tmp_path / "uci.json"
    args = ["adapt", "--checkpoint", str(checkpoint), "--dataset", "uci-digits", "--features", "input"]
    assert main([*args, "--epochs", "50", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "image/uci_digits" and result["test_samples"] == 397
    assert result["directory"] == ""  # nothing read from disk
    assert result["accuracy"] > 0.5, result  # chance is 0.1; pixels alone read most digits
    capsys.readouterr()
    assert main(["adapt", "--checkpoint", str(checkpoint), "--dataset", "fsdd"]) == 2
    assert "the fsdd dataset is read from a directory; give one (--dir)" in capsys.readouterr().err
