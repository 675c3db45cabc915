"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``). Nothing is pickled.

``config.json`` is the full resolved :class:`~workbench.config.Config` as a dict (``to_dict``) with two
extra top-level keys: ``"tasks"`` (the :class:`TaskSpec` list the heads were built for) and
``"format_version"``. Read it back with :func:`read_checkpoint_config` (which strips the extras before
``from_dict``). The network is rebuilt from that config and task list, then the weights are checked
key by key and shape by shape before loading: a checkpoint that does not match the code (a modality
or task the code cannot build, different widths, a tokenizer variant switched) is refused with a
:class:`~workbench.errors.CheckpointError` naming the first difference.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from workbench.config import Config, from_dict, to_dict, upgrade_model_keys
from workbench.errors import CheckpointError, ConfigError
from workbench.modalities import TaskSpec
from workbench.model.text_tokenizer import FILENAME as TOKENIZER_FILE
from workbench.model.text_tokenizer import TextTokenizer

if TYPE_CHECKING:
    from workbench.model.omnivec2 import OmniVec2

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_pretrained(
    model: OmniVec2,
    directory: str | Path,
    config: Config | None = None,
    text_tokenizer: TextTokenizer | None = None,
) -> Path:
    """Write the checkpoint; ``config`` (default: the model's) must describe the same network."""
    directory = Path(directory)
    config = config or model.config
    if config.model != model.config.model:
        raise ConfigError("the config's model section differs from the network being saved")
    tok = text_tokenizer or model.text_tokenizer
    if tok is not None and tok.vocab_size > config.model.text_vocab_size:
        raise ConfigError(
            f"the text tokenizer has {tok.vocab_size} ids but model.text_vocab_size="
            f"{config.model.text_vocab_size}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        **to_dict(config),
        "tasks": [t.to_dict() for t in model.tasks.values()],
        "format_version": FORMAT_VERSION,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(
        state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "format_version": str(FORMAT_VERSION)}
    )
    if tok is not None:
        tok.save(directory)
    return directory


def read_checkpoint_config(directory: str | Path) -> tuple[Config, list[TaskSpec]]:
    """The config and task list a checkpoint was built with; CheckpointError if unreadable or invalid."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or "tasks" not in meta:
        raise CheckpointError(f"{path} has no task list: it was not written by save_pretrained")
    version = meta.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}; this code reads format {FORMAT_VERSION}"
        )
    try:
        tasks = [TaskSpec.from_dict(t) for t in meta.pop("tasks")]
        # keys added later keep what older checkpoints were built with
        if isinstance(meta.get("model"), dict):
            upgrade_model_keys(meta["model"])
        config = from_dict(meta)
    except (ConfigError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} does not match this code's config: {err}") from None
    return config, tasks


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None


def _check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: Path) -> None:
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(
            f"{where} does not match the network: {len(missing)} tensors are missing, e.g. {missing[0]!r}"
        )
    for k, v in expected.items():
        if tuple(found[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{where} does not match the network: {k!r} has shape {tuple(found[k].shape)}, "
                f"the network expects {tuple(v.shape)}"
            )


def _check_expected_tasks(model: OmniVec2, expect: Sequence[TaskSpec], where: Path) -> None:
    for t in expect:
        have = model.tasks.get(t.key)
        if have is None:
            raise CheckpointError(
                f"{where} has no head for task {t.key}; it was trained for {list(model.tasks)}"
            )
        if (have.kind, have.labels, have.shape) != (t.kind, t.labels, t.shape):
            raise CheckpointError(f"{where}: task {t.key} was trained with different labels or target shape")


def _attach_tokenizer(model: OmniVec2, directory: Path) -> None:
    try:
        model.text_tokenizer = TextTokenizer.load(directory, model.config.model.max_text_tokens)
    except (ConfigError, ValueError, Exception) as err:  # tokenizers raises its own exception types
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{directory / TOKENIZER_FILE} does not fit the network: {err}") from None


def from_pretrained(
    directory: str | Path,
    build: Callable[[Config, list[TaskSpec]], OmniVec2],
    expect_tasks: Sequence[TaskSpec] | None = None,
) -> OmniVec2:
    """The network ``build(config, tasks)`` makes from the checkpoint's config, with its weights (and
    tokenizer) loaded after they were checked against it; in eval mode."""
    directory = Path(directory)
    config, tasks = read_checkpoint_config(directory)
    try:
        model = build(config, tasks)
    except ConfigError as err:
        raise CheckpointError(f"{directory} cannot be built by this code: {err}") from None
    state = _read_weights(directory)
    expected = model.state_dict()
    _check_state(expected, state, directory / WEIGHTS_FILE)
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} does not match the network: it has {len(unexpected)} "
            f"tensors the network lacks, e.g. {unexpected[0]!r}"
        )
    model.load_state_dict(state, strict=True)
    if (directory / TOKENIZER_FILE).is_file():
        _attach_tokenizer(model, directory)
    if expect_tasks:
        _check_expected_tasks(model, expect_tasks, directory)
    model.eval()
    return model


def load_components(model: OmniVec2, directory: str | Path, prefixes: Sequence[str]) -> list[str]:
    """Copy every tensor under ``prefixes`` (``"f"`` means ``f.*``) from a checkpoint into ``model``.

    Every tensor the model has under those prefixes must exist in the checkpoint with the same shape
    (else CheckpointError); tensors of the checkpoint the model lacks (a modality it does not use) are
    ignored. Loads the checkpoint's text tokenizer too when ``tokenizers`` is among the prefixes.
    Returns the names of the tensors loaded.
    """
    directory = Path(directory)
    read_checkpoint_config(directory)  # refuses a foreign or unreadable directory early
    state = _read_weights(directory)
    wanted = {
        k: v for k, v in model.state_dict().items() if any(k == p or k.startswith(p + ".") for p in prefixes)
    }
    if not wanted:
        raise CheckpointError(f"the network has no tensors under {list(prefixes)}")
    _check_state(wanted, state, directory / WEIGHTS_FILE)
    with torch.no_grad():
        own = model.state_dict()
        for k in wanted:
            own[k].copy_(state[k])
    if "tokenizers" in prefixes and (directory / TOKENIZER_FILE).is_file():
        _attach_tokenizer(model, directory)
    return sorted(wanted)
