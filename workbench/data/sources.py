"""Where tables come from: the embedded digits cache, FSDD recordings, IDX files and users' folders.

Real data is never bundled: it is read from a directory given at run time and cached (decoded,
resampled) under the data cache, keyed by a fingerprint of the files, so a second load is fast
and an edited folder is re-read.

- Free Spoken Digit Dataset: ``recordings/{digit}_{speaker}_{index}.wav`` (8 kHz). Test =
  the held-out speakers (``data.fsdd_holdout_speakers``; default: the last one alphabetically),
  so test voices are never heard in training; val = indices 0-4 of the other speakers (FSDD's own
  test convention); train = the rest.
- MNIST / Fashion-MNIST IDX files (``*-ubyte.gz``): ``train-*`` -> train (a seeded, stratified
  10% of it -> val), ``t10k-*`` -> test.
- A user's folder: one sub-folder per class (images, audio or video), optionally under
  ``train/``, ``val/``, ``test/`` sub-folders (otherwise a seeded stratified 80/10/10 split; without
  ``val/``, ~10% of train); text as JSONL or CSV rows with ``text`` and ``label`` (the split from a
  ``split`` field or from the file name ``train.jsonl``/``val.csv``/``test.jsonl``, else as above). Each
  ``data.folders`` entry becomes one (modality, task): key ``image`` names the task after the
  folder, key ``image/shapes`` names it ``shapes``.

:func:`load_benchmark` gathers the tables the config asks for into a
:class:`~workbench.data.benchmark.Benchmark`.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import re
import struct
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workbench.config import DataConfig
from workbench.data import digits, media, phrases
from workbench.data.audio import to_int16
from workbench.data.benchmark import SPLITS, Benchmark, Dense, Ragged, Strings, TaskData
from workbench.data.cache import ensure, files_fingerprint, load_tensors, read_json, save_tensors, write_json
from workbench.errors import ConfigError, MediaError
from workbench.modalities import (
    DIGITS,
    DIRECTIONS,
    LANGUAGES,
    MAX_CLIP_SECONDS,
    MODALITIES,
    SAMPLE_RATE,
    TaskSpec,
)
from workbench.paths import cache_dir

FASHION_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")  # fmt: skip
FSDD_FILE = re.compile(r"^(\d)_([^_]+)_(\d+)\.wav$")


def _spec(modality: str, name: str) -> TaskSpec:
    return next(t for t in MODALITIES[modality].default_tasks if t.name == name)


# ------------------------------------------------------------------------------- embedded digits
def ensure_digits(root: Path, seed: int, scale: float, force: bool = False) -> Path:
    """The embedded benchmark's cache directory, built first if missing (~10 s at scale 1)."""
    return ensure(
        root, "digits", digits.build_params(seed, scale), lambda out: digits.build(out, seed, scale), force
    )


def load_digits(
    path: Path, modalities: tuple[str, ...] | list[str] = tuple(MODALITIES)
) -> dict[str, TaskData]:
    """The eight tables of the embedded benchmark (or those of ``modalities``), in registry order."""
    out: dict[str, TaskData] = {}
    if "image" in modalities:
        t = load_tensors(path / "image.safetensors")
        clean, info = Dense(t["pixels"], (1, 28, 28)), {"source_id": t["source_id"]}
        out["image/digit"] = TaskData(
            _spec("image", "digit"), clean, t["digit"], t["digit"], t["split"], info
        )
        noisy = Dense(t["noisy"], (1, 28, 28))
        out["image/denoise"] = TaskData(_spec("image", "denoise"), noisy, clean, t["digit"], t["split"], info)
    if "audio" in modalities:
        t = load_tensors(path / "audio.safetensors")
        wave = Ragged(t["samples"], t["offsets"])
        info = {k: t[k] for k in ("voice", "rate", "pitch", "pitch_range")}
        for task in ("digit", "language"):
            out[f"audio/{task}"] = TaskData(_spec("audio", task), wave, t[task], t["digit"], t["split"], info)
    if "text" in modalities:
        items = read_json(path / "text.json")
        names = [tp.name for tp in phrases.TEMPLATES]
        col = {"digit": torch.tensor([it["digit"] for it in items]),
               "language": torch.tensor([LANGUAGES.index(it["language"]) for it in items]),
               "split": torch.tensor([SPLITS.index(it["split"]) for it in items], dtype=torch.uint8),
               "template": torch.tensor([names.index(it["template"]) for it in items])}  # fmt: skip
        texts = Strings([it["text"] for it in items])
        for task in ("digit", "language"):
            out[f"text/{task}"] = TaskData(_spec("text", task), texts, col[task], col["digit"], col["split"],
                                           {"template": col["template"]})  # fmt: skip
    if "video" in modalities:
        t = load_tensors(path / "video.safetensors")
        clips, info = (
            Dense(t["frames"], (t["frames"].shape[1], 1, *t["frames"].shape[2:])),
            {"source_id": t["source_id"]},
        )
        for task in ("digit", "motion"):
            out[f"video/{task}"] = TaskData(
                _spec("video", task), clips, t[task], t["digit"], t["split"], info
            )
    assert len(DIRECTIONS) == 8
    return out


# ---------------------------------------------------------------------------- one table on disk
def save_table(directory: Path, table: TaskData) -> dict:
    """Write a TaskData as ``table.safetensors`` (+ texts in ``texts.json``); returns its metadata."""
    tensors = {"digit": table.digit, "split": table.split, **{f"info.{k}": v for k, v in table.info.items()}}
    meta = {"spec": table.spec.to_dict(), "x_kind": table.x.kind}
    if isinstance(table.x, Dense):
        tensors["x"], meta["x_shape"], meta["x_scale"] = table.x.data, list(table.x.shape), table.x.scale
    elif isinstance(table.x, Ragged):
        tensors["x_flat"], tensors["x_offsets"], meta["x_scale"] = (
            table.x.flat,
            table.x.offsets,
            table.x.scale,
        )
    else:
        write_json(directory / "texts.json", table.x.texts)
    if isinstance(table.y, Dense):
        raise NotImplementedError("dense targets are only made by the embedded benchmark")
    tensors["y"] = table.y
    save_tensors(directory / "table.safetensors", tensors)
    return {"table": meta}


def load_table(directory: Path) -> TaskData:
    meta = read_json(directory / "meta.json")["table"]
    t = load_tensors(directory / "table.safetensors")
    if meta["x_kind"] == "dense":
        x = Dense(t["x"], tuple(meta["x_shape"]), meta["x_scale"])
    elif meta["x_kind"] == "ragged":
        x = Ragged(t["x_flat"], t["x_offsets"], meta["x_scale"])
    else:
        x = Strings(read_json(directory / "texts.json"))
    info = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("info.")}
    return TaskData(TaskSpec.from_dict(meta["spec"]), x, t["y"], t["digit"], t["split"], info)


def _digit_of(labels: tuple[str, ...], y: torch.Tensor) -> torch.Tensor:
    """The digit of each row when the class names are digits, else -1 everywhere."""
    if set(labels) <= set(DIGITS):
        return torch.tensor([int(labels[i]) for i in y.tolist()], dtype=torch.long)
    return torch.full_like(y, -1)


def _store(decoded: list) -> Dense | Ragged | Strings:
    """Decoded media -> compact storage: strings, int16 waveforms, or uint8 fixed-shape tensors."""
    if isinstance(decoded[0], str):
        return Strings(decoded)
    if decoded[0].dim() == 1:
        waves = [to_int16(w[: int(MAX_CLIP_SECONDS * SAMPLE_RATE)]) for w in decoded]  # cap training clips
        offsets = F.pad(torch.tensor([len(w) for w in waves]).cumsum(0), (1, 0))
        return Ragged(torch.cat(waves), offsets)
    shape = tuple(decoded[0].shape)
    return Dense((torch.stack(decoded).clamp(0, 1) * 255).round().to(torch.uint8), shape)


# ------------------------------------------------------------------------------------------ FSDD
def fsdd_recordings(directory: str | Path) -> tuple[Path, list[Path]]:
    """An FSDD ``recordings/`` folder (or its parent) and its ``{digit}_{speaker}_{index}.wav`` files."""
    d = Path(directory).expanduser()
    if (d / "recordings").is_dir():
        d = d / "recordings"
    files = sorted(p for p in d.glob("*.wav") if FSDD_FILE.match(p.name)) if d.is_dir() else []
    if not files:
        raise ConfigError(f"data.fsdd_dir={str(directory)!r} holds no FSDD recordings "
                          "({digit}_{speaker}_{index}.wav); point it at free-spoken-digit-dataset/recordings")  # fmt: skip
    return d, files


def load_fsdd(cfg: DataConfig, seed: int, root: Path, force: bool = False) -> tuple[Path, TaskData]:
    """The ``audio/digit`` table from FSDD recordings, speaker-disjoint test split (cached)."""
    directory, files = fsdd_recordings(cfg.fsdd_dir)
    parsed = [FSDD_FILE.match(f.name).groups() for f in files]  # type: ignore[union-attr]
    speakers = sorted({s for _, s, _ in parsed})
    holdout = sorted(cfg.fsdd_holdout_speakers) or speakers[-1:]
    unknown = [s for s in holdout if s not in speakers]
    if unknown:
        raise ConfigError(f"data.fsdd_holdout_speakers names {unknown}, not in the recordings: {speakers}")
    if set(holdout) == set(speakers):
        raise ConfigError(
            f"data.fsdd_holdout_speakers holds out every speaker {speakers}: nothing left to train on"
        )

    def build(out: Path) -> dict:
        waves, digit, split, speaker = [], [], [], []
        for f, (d, s, idx) in zip(files, parsed):
            waves.append(media.decode_audio(f, cfg.limits))
            digit.append(int(d))
            speaker.append(speakers.index(s))
            split.append(2 if s in holdout else 1 if int(idx) < 5 else 0)
        y = torch.tensor(digit)
        table = TaskData(_spec("audio", "digit"), _store(waves), y, y, torch.tensor(split, dtype=torch.uint8),
                         {"speaker": torch.tensor(speaker)})  # fmt: skip
        return {**save_table(out, table), "speakers": speakers, "holdout": holdout}

    params = {"dir": str(directory.resolve()), "files": files_fingerprint(files), "holdout": holdout,
              "limits": dataclasses.asdict(cfg.limits)}  # fmt: skip
    path = ensure(root, "fsdd", params, build, force)
    return path, load_table(path)


# ------------------------------------------------------------------------------------------- IDX
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST's format; ``.gz`` or plain) -> numpy array."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as err:
        raise MediaError(f"{path.name} is not a readable IDX file ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise MediaError(f"{path.name} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(data) < 4 + 4 * ndim + count * dtype.itemsize:
        raise MediaError(f"{path.name} is truncated: it declares shape {dims}")
    return (
        np.frombuffer(data, dtype, count, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))
    )


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``)."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}
    array = np.asarray(array)
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store {array.dtype}; use uint8, int8, int16, int32, float32 or float64")
    body = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body += array.astype(np.dtype(_IDX_TYPES[code])).tobytes()
    path = Path(path)
    with gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb") as f:
        f.write(body)


def _idx_pairs(directory: Path) -> dict[str, tuple[Path, Path]]:
    found: dict[str, dict[str, Path]] = {}
    for f in sorted(directory.glob("*-ubyte*")):
        m = re.match(r"^(train|t10k)-(images|labels)-idx\d-ubyte(\.gz)?$", f.name)
        if m:
            found.setdefault(m.group(1), {})[m.group(2)] = f
    return {k: (v["images"], v["labels"]) for k, v in found.items() if len(v) == 2}


def load_idx_dir(directory: Path, task: str, seed: int) -> TaskData:
    """MNIST-format IDX files -> an image classification table (``t10k`` = test, 10% of train = val)."""
    pairs = _idx_pairs(directory)
    if "train" not in pairs:
        raise ConfigError(f"{directory} has no train-images/train-labels IDX pair (*-ubyte.gz)")
    images, labels, split = [], [], []
    for part in ("train", "t10k"):
        if part in pairs:
            x, y = read_idx(pairs[part][0]), read_idx(pairs[part][1]).astype(np.int64)
            if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(y):
                raise MediaError(
                    f"{pairs[part][0].name} holds {x.shape} images; expected (N, 28, 28) with {len(y)} labels"
                )
            images.append(x.astype(np.uint8))
            labels.append(y)
            split.append(np.full(len(y), 0 if part == "train" else 2))
    fashion = "fashion" in str(directory).lower() or "fashion" in task
    return _image_table(np.concatenate(images), np.concatenate(labels), np.concatenate(split), task, seed,
                        FASHION_LABELS if fashion else None)  # fmt: skip


UCI_TRAIN = 1400  # load_digits' first 1,400 images train, the other 397 test


def load_uci_digits(seed: int, n_train: int = UCI_TRAIN) -> TaskData:
    """scikit-learn's bundled ``load_digits`` (1,797 real handwritten digits from UCI, 8x8 at 17 grey
    levels) drawn as MNIST is: scaled to 0-255, resized to 20x20 (bilinear) and centred on 28x28. The
    first ``n_train`` are the training split (10% of them val), the rest test. The writers are not
    recorded, so unlike FSDD's speakers they may appear on both sides of the split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    grey = (x.reshape(-1, 8, 8) * 255 / 16).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((20, 20), Image.BILINEAR)) for im in grey])
    split = np.where(np.arange(len(y)) < n_train, 0, 2)
    return _image_table(np.pad(big, ((0, 0), (4, 4), (4, 4))), y.astype(np.int64), split, "uci_digits", seed)


def _image_table(x: np.ndarray, y: np.ndarray, split: np.ndarray, task: str, seed: int,
                 names: tuple[str, ...] | None = None) -> TaskData:  # fmt: skip
    """(N, 28, 28) uint8 images with labels and a train (0) / test (2) column -> a classification table
    whose val split is a stratified, seeded 10% of train."""
    split = split.copy()
    split[_stratified_pick(y, np.flatnonzero(split == 0), 0.1, seed)] = 1
    names = names or tuple(str(i) for i in range(max(10, int(y.max()) + 1)))
    yt = torch.from_numpy(y)
    return TaskData(TaskSpec("image", task, "classification", names),
                    Dense(torch.from_numpy(x.astype(np.uint8, copy=False)), (1, 28, 28)), yt, _digit_of(names, yt),
                    torch.from_numpy(split).to(torch.uint8))  # fmt: skip


def _stratified_pick(labels: np.ndarray, rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded ``fraction`` of ``rows`` from every class (at least one if the class has >= 2 rows)."""
    out = []
    for c in np.unique(labels[rows]):
        r = rows[labels[rows] == c]
        r = r[np.random.default_rng([seed % 2**32, 13, int(c)]).permutation(len(r))]
        out.append(r[: max(1 if len(r) >= 2 else 0, round(len(r) * fraction))])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


# --------------------------------------------------------------------------------- user folders
def _folder_key(key: str, directory: Path) -> tuple[str, str]:
    modality, _, task = key.partition("/")
    if modality not in MODALITIES:
        raise ConfigError(f"data.folders key {key!r} must start with a modality: {', '.join(MODALITIES)}")
    task = task or re.sub(r"[^0-9A-Za-z]+", "_", directory.stem).strip("_").lower() or "label"
    return modality, task


def _read_records(files: list[Path]) -> list[dict]:
    rows = []
    for f in files:
        split_hint = f.stem if f.stem in SPLITS else None
        if f.suffix == ".jsonl":
            lines = f.read_text(encoding="utf-8").splitlines()
            try:
                recs = [json.loads(line) for line in lines if line.strip()]
            except json.JSONDecodeError as err:
                raise MediaError(f"{f.name} is not valid JSONL ({err})") from None
        else:
            with open(f, newline="", encoding="utf-8") as fh:
                recs = list(csv.DictReader(fh))
        for i, r in enumerate(recs):
            if not isinstance(r, dict) or "text" not in r or "label" not in r:
                raise MediaError(f"{f.name} row {i + 1} needs 'text' and 'label' fields")
            rows.append({"text": r["text"], "label": str(r["label"]), "split": r.get("split") or split_hint})
    return rows


def _class_files(directory: Path, modality: str) -> list[tuple[Path, str, str | None]]:
    """(file, class, split or None) for a class-per-sub-folder tree, optionally under train/val/test."""
    exts = MODALITIES[modality].extensions
    roots = [(directory / s, s) for s in SPLITS if (directory / s).is_dir()] or [(directory, None)]
    out = []
    for base, split in roots:
        for cls_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            out += [(f, cls_dir.name, split) for f in sorted(cls_dir.rglob("*"))
                    if f.is_file() and f.suffix.lower() in exts and not f.name.startswith(".")]  # fmt: skip
    return out


def _assign_splits(y: np.ndarray, given: list[str | None], seed: int) -> np.ndarray:
    """Given split names where present; otherwise a seeded stratified 80/10/10 split. Without any
    val rows (e.g. only ``train/`` and ``test/`` folders), a stratified ~10% of train becomes val."""
    split = np.array([SPLITS.index(s) if s in SPLITS else -1 for s in given])
    free = np.flatnonzero(split < 0)
    if len(free):
        split[free] = 0
        test = _stratified_pick(y, free, 0.1, seed)
        split[test] = 2
        split[_stratified_pick(y, np.setdiff1d(free, test), 1 / 9, seed + 1)] = 1
    if not (split == 1).any():
        split[_stratified_pick(y, np.flatnonzero(split == 0), 0.1, seed + 2)] = 1
    if not (split == 0).any():
        raise ConfigError("the folder has no training samples (add a train/ sub-folder or more files)")
    return split


def load_folder(
    key: str, directory: str | Path, cfg: DataConfig, seed: int, root: Path, force: bool = False
) -> TaskData:
    """One ``data.folders`` entry -> a cached classification table."""
    directory = Path(directory).expanduser()
    if not directory.exists():
        raise ConfigError(f"data.folders.{key}={str(directory)!r} does not exist")
    modality, task = _folder_key(key, directory)
    if modality == "image" and directory.is_dir() and _idx_pairs(directory):
        return load_idx_dir(directory, task, seed)  # already decoded pixels: nothing to cache
    if modality == "text":
        files = (
            [directory]
            if directory.is_file()
            else sorted([*directory.glob("*.jsonl"), *directory.glob("*.csv")])
        )
    else:
        files = [f for f, _, _ in _class_files(directory, modality)] if directory.is_dir() else []
    if not files:
        want = (
            "JSONL/CSV files with text,label" if modality == "text" else "one sub-folder of files per class"
        )
        raise ConfigError(f"data.folders.{key}={str(directory)!r} holds no data: expected {want}")

    def build(out: Path) -> dict:
        if modality == "text":
            rows = _read_records(files)
            items = [media.decode_text(r["text"], cfg.limits) for r in rows]
            classes, given = [r["label"] for r in rows], [r["split"] for r in rows]
        else:
            found = _class_files(directory, modality)
            items = [media.decode(modality, f, cfg.limits) for f, _, _ in found]
            classes, given = [c for _, c, _ in found], [s for _, _, s in found]
        names = tuple(sorted(set(classes), key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c)))
        y = np.array([names.index(c) for c in classes])
        yt = torch.from_numpy(y)
        spec = TaskSpec(modality, task, "classification", names)
        split = torch.from_numpy(_assign_splits(y, given, seed)).to(torch.uint8)
        return save_table(out, TaskData(spec, _store(items), yt, _digit_of(names, yt), split))

    params = {"key": key, "dir": str(directory.resolve()), "files": files_fingerprint(files), "seed": seed,
              "limits": dataclasses.asdict(cfg.limits)}  # fmt: skip
    return load_table(ensure(root, f"folder-{modality}-{task}", params, build, force))


def load_folders(cfg: DataConfig, seed: int, root: Path, force: bool = False) -> list[TaskData]:
    if not cfg.folders:
        raise ConfigError(
            "data.source=folders needs data.folders.<modality>=DIR (e.g. data.folders.image=~/digits)"
        )
    wanted = {
        k: d
        for k, d in cfg.folders.items()
        if k.partition("/")[0] in cfg.modalities or k.partition("/")[0] not in MODALITIES
    }
    return [load_folder(k, d, cfg, seed, root, force) for k, d in wanted.items()]  # bad keys still raise


def load_benchmark(cfg: DataConfig | None = None, seed: int = 0, *, root: str | Path | None = None,
                   force: bool = False) -> Benchmark:  # fmt: skip
    """Build the data cache if missing (deterministic, offline), then load it into memory.

    ``root`` overrides the cache location (``data.cache_dir``, ``$WORKBENCH_CACHE``,
    ``~/.cache/workbench``); ``force`` rebuilds even if the cache exists.
    """
    cfg = cfg or DataConfig()
    root = Path(root) if root else cache_dir(cfg.cache_dir)
    t0 = time.perf_counter()
    data: dict[str, TaskData] = {}
    meta: dict = {}
    if cfg.source == "digits":
        embedded = [m for m in cfg.modalities if not (m == "audio" and cfg.audio_source == "fsdd")]
        if embedded:
            path = ensure_digits(root, seed, cfg.scale, force=force)
            data.update(load_digits(path, embedded))
            meta = {"cache": str(path)}
        if cfg.audio_source == "fsdd" and "audio" in cfg.modalities:
            fsdd_path, table = load_fsdd(cfg, seed, root, force=force)
            data[table.spec.key] = table
            meta["fsdd_cache"] = str(fsdd_path)
    else:
        for table in load_folders(cfg, seed, root, force=force):
            if table.spec.modality in cfg.modalities:
                data[table.spec.key] = table
        if not data:
            raise ConfigError("data.source=folders but no folder matches data.modalities: set "
                              "data.folders.<modality>=DIR (e.g. data.folders.image=~/my_digits)")  # fmt: skip
    meta["load_seconds"] = round(time.perf_counter() - t0, 3)
    return Benchmark(data, cfg.source, root, meta)
