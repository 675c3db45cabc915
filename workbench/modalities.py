"""The registry of modalities and tasks, shared by data, model, training, evaluation and the app.

Generic code never names a modality: it iterates over :data:`MODALITIES` and over the
:class:`TaskSpec` list a dataset reports. This module is plain data (no torch import) so the config,
the CLI and the app can read it cheaply.

Tensor contract of a :class:`~workbench.data.Batch` per modality (B = batch):

=========  ===========================================  ===========================================
modality   ``x``                                        ``lengths``
=========  ===========================================  ===========================================
image      float32 (B, 1, 28, 28) in [0, 1], ink high   None
audio      float32 (B, L) mono waveform at 16 kHz,      int64 (B,) valid samples per row
           zero-padded on the right
video      float32 (B, T, 1, S, S) in [0, 1], ink high  None
text       int64 (B, N) word token ids, 0 = padding     int64 (B,) valid tokens per row
=========  ===========================================  ===========================================

``y`` is int64 (B,) class indices for classification tasks and float32 with the target's shape
(e.g. (B, 1, 28, 28) for ``denoise``) for dense tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_SIZE = 28  # MNIST geometry: the digit fits 20x20, centre of mass at the centre of 28x28
VIDEO_FRAMES = 8  # frames per moving-digit clip
VIDEO_SIZE = 32  # square canvas of each frame
SAMPLE_RATE = 16_000  # every waveform is resampled to this rate
MAX_CLIP_SECONDS = 2.0  # training clips longer than this are rejected when the bank is built

DIGITS = tuple(str(d) for d in range(10))
LANGUAGES = ("en", "de", "fr", "es", "it")  # spoken and written digits (num2words + espeak-ng voices)
DIRECTIONS = ("E", "NE", "N", "NW", "W", "SW", "S", "SE")  # motion of a moving digit, 45 degrees apart


@dataclass(frozen=True)
class TaskSpec:
    """One (modality, task): what a head predicts and how it is scored.

    kind: ``classification`` (cross-entropy; accuracy and macro-F1) or ``dense`` (per-pixel L2; PSNR).
    """

    modality: str
    name: str
    kind: str
    labels: tuple[str, ...] = ()  # class names, for classification
    shape: tuple[int, ...] = ()  # per-sample target shape, for dense tasks

    @property
    def key(self) -> str:
        return f"{self.modality}/{self.name}"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        return {"modality": self.modality, "name": self.name, "kind": self.kind,
                "labels": list(self.labels), "shape": list(self.shape)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        return cls(d["modality"], d["name"], d["kind"], tuple(d.get("labels", ())), tuple(d.get("shape", ())))


@dataclass(frozen=True)
class ModalitySpec:
    """A registered modality: its name, the media it decodes, and its default tasks."""

    name: str
    extensions: tuple[str, ...]  # file types the media decoder accepts
    default_tasks: tuple[TaskSpec, ...] = field(default_factory=tuple)


def _cls(modality: str, name: str, labels: tuple[str, ...]) -> TaskSpec:
    return TaskSpec(modality, name, "classification", labels)


MODALITIES: dict[str, ModalitySpec] = {
    "image": ModalitySpec(
        "image",
        (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"),
        (
            _cls("image", "digit", DIGITS),
            TaskSpec("image", "denoise", "dense", (), (1, IMAGE_SIZE, IMAGE_SIZE)),
        ),
    ),
    "audio": ModalitySpec(
        "audio",
        (".wav", ".flac", ".ogg", ".mp3"),
        (_cls("audio", "digit", DIGITS), _cls("audio", "language", LANGUAGES)),
    ),
    "text": ModalitySpec(
        "text", (".txt",), (_cls("text", "digit", DIGITS), _cls("text", "language", LANGUAGES))
    ),
    "video": ModalitySpec(
        "video",
        (".mp4", ".webm", ".avi", ".gif", ".mkv", ".mov"),
        (_cls("video", "digit", DIGITS), _cls("video", "motion", DIRECTIONS)),
    ),
}


def default_tasks(modalities: tuple[str, ...] | list[str] | None = None) -> list[TaskSpec]:
    """The embedded benchmark's tasks for the given modalities (all four by default), in registry order."""
    names = list(MODALITIES) if modalities is None else [m for m in MODALITIES if m in modalities]
    return [t for m in names for t in MODALITIES[m].default_tasks]
