"""Typed configuration: YAML round trip, presets, overrides, and rejection of bad keys and values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.config import (
    MODEL_PRESETS,
    Config,
    from_dict,
    load_config,
    save_config,
    to_dict,
    to_yaml,
    valid_keys,
)
from workbench.errors import ConfigError


def test_defaults_resolve_and_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.preset == "small" and cfg.train.stage == 3 and cfg.data.source == "digits"


def test_each_stage_gets_its_share_of_the_default_run_unless_steps_are_given():
    from workbench.config import STAGE_LR, STAGE_STEPS

    for stage in (1, 2, 3):
        cfg = load_config(overrides=[f"train.stage={stage}"])
        assert (cfg.train.steps, cfg.train.lr) == (STAGE_STEPS[stage], STAGE_LR[stage])
        cfg = load_config(overrides=[f"train.stage={stage}", "train.steps=7", "train.lr=1e-3"])
        assert (cfg.train.steps, cfg.train.lr) == (7, 1e-3)
    assert STAGE_STEPS[3] >= max(STAGE_STEPS.values())  # the supervised stage gets the most
    # the shipped default.yaml describes the same run as the built-in defaults
    shipped = load_config([Path(__file__).parents[1] / "configs" / "default.yaml"])
    assert shipped == load_config()


def test_init_takes_the_network_from_the_checkpoint_but_not_its_training_settings(tmp_path):
    """A chain `--stage 1 train.lr=... train.steps=...` then `--stage 2 --init`: stage 2 builds the same
    network on the same data and seed, and trains with its own defaults (steps, lr, mask ratios)."""
    from workbench.config import STAGE_LR, STAGE_STEPS, save_config
    from workbench.train import resolve_run

    first, _ = resolve_run(
        1, (), ["seed=5", "model.preset=tiny", "data.scale=0.2", "train.lr=1e-3", "train.steps=17"], out="u"
    )
    save_config(first, tmp_path / "checkpoint")
    second, _ = resolve_run(2, (), [], init=str(tmp_path / "checkpoint"), out=str(tmp_path / "s2"))
    assert second.model == first.model and second.data == first.data and second.seed == 5
    assert second.train.stage == 2 and second.train.steps == STAGE_STEPS[2]
    assert second.train.lr == STAGE_LR[2] != first.train.lr
    third, _ = resolve_run(3, (), ["train.lr=2e-4"], init=str(tmp_path / "checkpoint"), out="u3")
    assert third.train.steps == STAGE_STEPS[3] and third.train.lr == 2e-4


def test_yaml_round_trip(tmp_path):
    cfg = load_config(
        overrides=["seed=7", "train.steps=123", "model.preset=tiny", "data.limits.max_text_chars=99"]
    )
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(files=[path])
    assert again == cfg
    assert to_dict(again)["train"]["steps"] == 123


def test_shipped_config_files_resolve(repo):
    for path in sorted((repo / "configs").glob("*.yaml")):
        load_config(files=[path])


def test_save_config_writes_yaml_and_json(tmp_path):
    cfg = load_config(overrides=["seed=3"])
    save_config(cfg, tmp_path / "run")
    assert from_dict(json.loads((tmp_path / "run" / "config.json").read_text())) == cfg
    assert load_config(files=[tmp_path / "run" / "config.yaml"]) == cfg


def test_preset_fills_model_and_explicit_keys_win():
    tiny = load_config(overrides=["model.preset=tiny"])
    assert tiny.model.dim == MODEL_PRESETS["tiny"]["dim"]
    wider = load_config(overrides=["model.preset=tiny", "model.dim=64", "model.heads=4"])
    assert wider.model.dim == 64 and wider.model.depth_f == MODEL_PRESETS["tiny"]["depth_f"]


def test_the_last_layer_naming_a_preset_picks_it_and_a_load_leaves_the_next_untouched(tmp_path):
    """load_config merges every layer into one copy of a schema built once: the preset comes from the
    last layer that names one (here the overrides over a file), and nothing of one load reaches the next."""
    fresh, presets = to_dict(load_config()), json.loads(json.dumps(MODEL_PRESETS))
    f = tmp_path / "a.yaml"
    f.write_text("model:\n  preset: base\n  dim: 96\ndata:\n  folders: {x: /tmp}\n")
    cfg = load_config(files=[f], overrides=["model.preset=tiny", "train.steps=7"])
    assert cfg.model.preset == "tiny" and cfg.model.depth_f == MODEL_PRESETS["tiny"]["depth_f"]
    assert cfg.model.dim == 96 and cfg.data.folders == {"x": "/tmp"} and cfg.train.steps == 7
    assert load_config(files=[f]).model.depth_f == MODEL_PRESETS["base"]["depth_f"]
    with pytest.raises(ConfigError, match=r"model\.preset='3' is not one of"):
        load_config(files=[f], overrides=["model.preset=3"])
    load_config(overrides=["model.preset=tiny", "model.fc_dims=[8,8,8]", "model.stem.image=linear"])
    assert to_dict(load_config()) == fresh == to_dict(from_dict(fresh))
    assert json.loads(json.dumps(MODEL_PRESETS)) == presets  # the presets merged underneath stay as written


def test_a_repeated_load_is_resolved_once_and_every_caller_gets_its_own_config(tmp_path, monkeypatch):
    import workbench.config as config

    resolved = []
    resolve = config._resolve
    monkeypatch.setattr(config, "_resolve", lambda *a: resolved.append(a) or resolve(*a))
    monkeypatch.setattr(config, "_LOADS", {})
    f = tmp_path / "a.yaml"
    f.write_text("train:\n  steps: 5\n")
    first = load_config(files=[f], overrides=["train.lr=0.01"])
    first.train.steps = 99  # a caller changing its config changes no one else's
    again = load_config(files=[f], overrides=["train.lr=0.01"])
    assert again is not first and (again.train.steps, again.train.lr) == (5, 0.01) and len(resolved) == 1
    f.write_text("train:\n  steps: 6\n")  # same size, new bytes: a new input
    assert load_config(files=[f], overrides=["train.lr=0.01"]).train.steps == 6 and len(resolved) == 2
    saved = to_dict(again)
    assert to_dict(from_dict(saved)) == to_dict(from_dict(saved)) == saved and len(resolved) == 3
    assert from_dict(saved) is not from_dict(saved)
    with pytest.raises(ConfigError, match=r"train\.step"):  # errors are raised every time, never remembered
        load_config(overrides=["train.step=3"])
    with pytest.raises(ConfigError, match=r"train\.step"):
        load_config(overrides=["train.step=3"])
    assert len(resolved) == 5
    load_config(base={"data": {"fsdd_dir": tmp_path}})  # not JSON: resolved afresh each time
    load_config(base={"data": {"fsdd_dir": tmp_path}})
    assert len(resolved) == 7
    monkeypatch.setattr(config, "_resolve", lambda *a: Config())  # the bound: the newest 256 inputs
    for seed in range(300):
        load_config(overrides=[f"seed={seed}"])
    assert len(config._LOADS) == 256 and ((), ("seed=299",), "") in config._LOADS
    assert ((), ("seed=0",), "") not in config._LOADS


def test_file_then_overrides_order(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("train:\n  steps: 5\n  lr: 0.01\n")
    cfg = load_config(files=[f], overrides=["train.steps=9"])
    assert (cfg.train.steps, cfg.train.lr) == (9, 0.01)


@pytest.mark.parametrize(
    ("override", "closest"),
    [
        ("train.step=3", "train.steps"),
        ("trian.steps=3", "train.steps"),
        ("model.presets=tiny", "model.preset"),
        ("steps=3", "train.steps"),
        ("data.limits.max_text_char=3", "data.limits.max_text_chars"),
    ],
)
def test_unknown_key_names_closest(override, closest):
    with pytest.raises(ConfigError, match=f"closest valid key is '{closest}'"):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.steps=many", "train.steps"),
        ("train.steps=-1", "train.steps"),
        ("train.lr=-1", "train.lr"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("model.preset=huge", "model.preset"),
        ("model.dim=30", "model.dim"),
        ("data.source=internet", "data.source"),
        ("train.mask_ratio.image=1.5", "train.mask_ratio.image"),
        ("data.modalities=[smell]", "data.modalities"),
        ("train.stage=4", "train.stage"),
        ("nonsense", "key=value"),
    ],
)
def test_bad_values_rejected(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config(overrides=[override])


def test_bad_yaml_files_rejected(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(files=[missing])
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(files=[broken])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(files=[unknown])


def test_misspelt_choice_suggests():
    with pytest.raises(ConfigError, match="did you mean 'bf16'"):
        load_config(overrides=["train.mixed_precision=bf61"])


def test_valid_keys_cover_nested_fields():
    keys = valid_keys()
    for key in ("seed", "train.steps", "train.batch_size", "train.checkpoint_every", "train.mixed_precision",
                "model.preset", "data.source", "data.audio_source", "data.fsdd_dir", "data.limits.max_audio_seconds"):  # fmt: skip
        assert key in keys
