"""The media decoder: every format the workbench accepts, real files written here, and every bad input."""

from __future__ import annotations

import io
import itertools
import struct
import zlib

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageDraw

from workbench.config import LimitsConfig
from workbench.data import media
from workbench.data.digits import load_mnist_5k, render_clips
from workbench.data.speech import synthesize
from workbench.errors import MediaError
from workbench.modalities import IMAGE_SIZE, SAMPLE_RATE, VIDEO_FRAMES, VIDEO_SIZE


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    return load_mnist_5k()


@pytest.fixture(scope="module")
def seven() -> tuple[np.ndarray, int]:
    """A real spoken word: eSpeak NG saying "seven" (int16 at 22,050 Hz)."""
    return synthesize("seven", "en+m3", rate=150)


def _corr(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def _encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_image_formats_round_trip_mnist(mnist, fmt):
    """An MNIST digit saved in every format decodes back to (almost) itself: MNIST geometry is a fixed point."""
    px, _ = mnist
    for i in (0, 1234, 4321):
        x = media.decode_image(_encode_image(Image.fromarray(px[i]), fmt))
        assert x.shape == (1, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert _corr(x, px[i] / 255) > (0.9 if fmt != "JPEG" else 0.85)


def test_image_photo_of_dark_ink_on_light_paper(mnist, tmp_path):
    """A big, coloured, dark-on-light, noisy 'photo' of a digit becomes the light-on-dark MNIST digit."""
    px, _ = mnist
    digit = np.array(Image.fromarray(px[7]).resize((560, 560), Image.BILINEAR), dtype=np.float32) / 255
    canvas = np.full((700, 900, 3), (0.93, 0.9, 0.8), dtype=np.float32)  # cream paper
    ink = np.array([0.1, 0.1, 0.45], dtype=np.float32)  # blue pen
    canvas[70:630, 170:730] = canvas[70:630, 170:730] * (1 - digit[..., None]) + ink * digit[..., None]
    canvas += np.random.default_rng(0).normal(0, 0.03, canvas.shape).astype(np.float32)
    path = tmp_path / "photo.jpg"
    Image.fromarray((np.clip(canvas, 0, 1) * 255).astype(np.uint8)).save(path, quality=90)
    x = media.decode_image(path)
    assert _corr(x, px[7] / 255) > 0.85
    assert float(x[0, 0].abs().sum() + x[0, -1].abs().sum()) == 0  # background cleared to zero


@pytest.mark.parametrize("white_on_transparent", [True, False])
def test_image_transparent_sketch_keeps_its_strokes(white_on_transparent):
    colour = (255, 255, 255, 255) if white_on_transparent else (0, 0, 0, 255)
    img = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    ImageDraw.Draw(img).line([(150, 40), (150, 260)], fill=colour, width=14)  # a "1"
    x = media.decode_image(_encode_image(img, "PNG"))[0]
    rows, cols = torch.nonzero(x > 0.5, as_tuple=True)
    assert rows.max() - rows.min() + 1 == 20  # fitted to the 20-pixel box
    assert cols.max() - cols.min() + 1 <= 3  # still a thin vertical stroke
    assert abs(float(cols.float().mean()) - IMAGE_SIZE / 2) <= 1.5


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "CMYK"])
def test_image_modes(mnist, mode):
    px, _ = mnist
    img = Image.fromarray(px[42]).resize((56, 56))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img).astype(np.uint16) * 257).astype(np.uint16))
    else:
        img = img.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG" if mode != "1" else "BMP"
    x = media.decode_image(_encode_image(img, fmt))
    assert x.shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert _corr(x, px[42] / 255) > 0.8


def test_image_centre_of_mass_and_box():
    img = Image.new("L", (200, 120), 255)
    ImageDraw.Draw(img).rectangle([10, 10, 60, 40], fill=0)  # off-centre, wider than tall
    x = media.decode_image(_encode_image(img, "PNG"))[0]
    rows, cols = torch.nonzero(x > 0.5, as_tuple=True)
    assert cols.max() - cols.min() + 1 == 20  # the longer side fits the 20-pixel box
    assert 10 <= rows.max() - rows.min() + 1 <= 14  # aspect ratio kept (31/51 * 20 = 12)
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    assert abs(float((x * ys).sum() / x.sum()) - 14) <= 1 and abs(float((x * xs).sum() / x.sum()) - 14) <= 1


# ------------------------------------------------------------------------------------------- audio
@pytest.mark.parametrize(("fmt", "subtype"), [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"),
                                              ("MP3", "MPEG_LAYER_III")])  # fmt: skip
def test_audio_formats(seven, fmt, subtype, tmp_path):
    """A spoken word in every format, at 44.1 kHz stereo, decodes to mono 16 kHz, trimmed and normalised."""
    samples, rate = seven
    word = samples.astype(np.float32) / 32768
    padded = np.concatenate([np.zeros(rate // 2, np.float32), word, np.zeros(rate // 2, np.float32)])
    stereo = np.stack([padded, 0.5 * padded], 1)
    from workbench.data.audio import resample

    stereo44 = resample(torch.from_numpy(stereo.T.copy()), rate, 44_100).T.numpy()
    path = tmp_path / f"seven.{fmt.lower()}"
    sf.write(path, stereo44, 44_100, format=fmt, subtype=subtype)
    x = media.decode_audio(path)
    assert x.dim() == 1 and x.dtype == torch.float32
    word_seconds = len(word) / rate
    assert 0.5 * word_seconds < x.numel() / SAMPLE_RATE < word_seconds + 0.1  # the 1 s of silence is gone
    assert abs(float(x.pow(2).mean().sqrt()) - 0.1) < 0.01 and float(x.abs().max()) <= 1.0


def test_audio_pyav_fallback_for_other_codecs(seven):
    """AAC in MP4 (which libsndfile cannot read) goes through PyAV."""
    samples, rate = seven
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        stream = c.add_stream("aac", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(
            (samples[None].astype(np.float32) / 32768), format="fltp", layout="mono"
        )
        frame.sample_rate = rate
        for p in [*stream.encode(frame), *stream.encode()]:
            c.mux(p)
    x = media.decode_audio(buf.getvalue())
    assert 0.2 < x.numel() / SAMPLE_RATE < 1.0


# ------------------------------------------------------------------------------------------- video
def _moving_clip(px: np.ndarray) -> torch.Tensor:
    """A digit moving east by 2 px per frame: uint8 (8, 32, 32)."""
    return render_clips(
        torch.from_numpy(px[None]), torch.tensor([0]), torch.tensor([2.0]), torch.tensor([[0.0, 8.0]])
    )[0]


def _write_video(frames: np.ndarray, fmt: str, codec: str, size: int = 64) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        stream = c.add_stream(codec, rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for f in frames:
            img = np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR))
            for p in stream.encode(av.VideoFrame.from_ndarray(img, format="gray").reformat(format="yuv420p")):
                c.mux(p)
        for p in stream.encode():
            c.mux(p)
    return buf.getvalue()


def _centre_x(clip: torch.Tensor) -> list[float]:
    cols = torch.arange(VIDEO_SIZE, dtype=torch.float32)
    return [float((f[0].sum(0) * cols).sum() / f[0].sum()) for f in clip]


@pytest.mark.parametrize(("fmt", "codec"), [("mp4", "libx264"), ("mp4", "mpeg4"), ("webm", "libvpx-vp9"),
                                            ("avi", "mpeg4"), ("gif", None)])  # fmt: skip
def test_video_formats_keep_the_motion(mnist, fmt, codec):
    px, _ = mnist
    clip = _moving_clip(px[3]).numpy()
    if fmt == "gif":  # dark on light, to check polarity on the whole clip
        frames = [Image.fromarray(255 - f) for f in clip]
        buf = io.BytesIO()
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
        data = buf.getvalue()
    else:
        data = _write_video(clip, fmt, codec)
    x = media.decode_video(data)
    assert (
        x.shape == (VIDEO_FRAMES, 1, VIDEO_SIZE, VIDEO_SIZE) and float(x.min()) >= 0 and float(x.max()) <= 1
    )
    xs = _centre_x(x)
    assert all(b > a for a, b in itertools.pairwise(xs))  # still moving east
    assert abs((xs[-1] - xs[0]) - 14) < 1.5  # 7 steps of 2 px
    assert float((x[:, 0] - torch.from_numpy(clip).float() / 255).abs().mean()) < 0.03


def test_video_long_clip_is_subsampled_and_non_square_is_letterboxed(mnist):
    px, _ = mnist
    clip = np.repeat(_moving_clip(px[5]).numpy(), 5, axis=0)  # 40 frames
    wide = np.zeros((40, 32, 64), np.uint8)
    wide[:, :, 16:48] = clip
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as c:
        stream = c.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        for f in wide:
            for p in stream.encode(av.VideoFrame.from_ndarray(f, format="gray").reformat(format="yuv420p")):
                c.mux(p)
        for p in stream.encode():
            c.mux(p)
    x = media.decode_video(buf.getvalue())
    assert x.shape == (VIDEO_FRAMES, 1, VIDEO_SIZE, VIDEO_SIZE)
    assert float(x[:, :, :8].sum()) == 0 and float(x[:, :, -8:].sum()) == 0  # 2:1 frame centred in 32x32
    xs = _centre_x(x)
    assert xs[-1] - xs[0] > 5


# -------------------------------------------------------------------------------------------- text
def test_text_normalisation():
    assert media.decode_text("  sieben\t\n plus\u200b zwei  ") == "sieben plus zwei"
    assert media.decode_text("cafe\u0301".encode()) == "café"  # NFC
    assert media.decode_text("siete") == media.decode_text(media.decode_text("siete"))


@pytest.mark.parametrize("bad", ["", "   \n\t ", "\u200b\u200b"])
def test_text_empty(bad):
    with pytest.raises(MediaError, match="empty"):
        media.decode_text(bad)


def test_text_too_long_and_not_utf8():
    with pytest.raises(MediaError, match="limit is 10"):
        media.decode_text("a" * 11, LimitsConfig(max_text_chars=10))
    with pytest.raises(MediaError, match="characters long"):
        media.decode_text("x" * 10_000_000)
    with pytest.raises(MediaError, match="UTF-8"):
        media.decode_text(b"\xff\xfe\xfa")


# --------------------------------------------------------------------------------------- bad input
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (the pixels are never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_huge_image_is_refused_from_its_header():
    with pytest.raises(MediaError, match="400,000,000 pixels; the limit is 25,000,000"):
        media.decode_image(_png_header_only(20000, 20000))  # Pillow's own bomb guard fires first here
    with pytest.raises(MediaError, match="6000x5000 pixels; the limit is 25,000,000"):
        media.decode_image(_png_header_only(6000, 5000))


def test_truncated_files(mnist, seven, tmp_path):
    px, _ = mnist
    png = _encode_image(Image.fromarray(px[0]).resize((280, 280)), "PNG")
    with pytest.raises(MediaError, match=r"truncated|corrupt"):
        media.decode_image(png[: len(png) // 2])
    samples, rate = seven
    for fmt in ("WAV", "FLAC", "MP3"):
        buf = io.BytesIO()
        sf.write(buf, samples, rate, format=fmt)
        data = buf.getvalue()
        with pytest.raises(MediaError, match=r"truncated|corrupt|readable"):
            media.decode_audio(data[: len(data) // 2])
    mp4 = _write_video(_moving_clip(px[1]).numpy(), "mp4", "libx264")
    with pytest.raises(MediaError, match=r"truncated|corrupt|readable"):
        media.decode_video(mp4[: len(mp4) // 2])


def test_text_file_named_like_media(tmp_path):
    for name, decode in (("digit.png", media.decode_image), ("digit.wav", media.decode_audio),
                         ("digit.mp4", media.decode_video)):  # fmt: skip
        path = tmp_path / name
        path.write_text("this is not a picture, a sound or a film\n" * 20)
        with pytest.raises(MediaError, match=name):
            decode(path)


def test_silence_blank_and_empty():
    with pytest.raises(MediaError, match="silent"):
        buf = io.BytesIO()
        sf.write(buf, np.zeros(16000, np.float32), 16000, format="WAV")
        media.decode_audio(buf.getvalue())
    with pytest.raises(MediaError, match="blank"):
        media.decode_image(_encode_image(Image.new("RGB", (64, 64), (200, 30, 30)), "PNG"))
    with pytest.raises(MediaError, match="empty"):
        media.decode_image(b"")


def test_zero_frame_video(tmp_path):
    path = tmp_path / "empty.avi"
    with av.open(str(path), "w", format="avi") as c:
        stream = c.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        c.start_encoding()
    with pytest.raises(MediaError, match="no video frames"):
        media.decode_video(path)
    audio_only = tmp_path / "audio.wav"
    sf.write(audio_only, np.zeros(800, np.float32), 8000)
    with pytest.raises(MediaError, match="MP4, WebM, AVI or GIF"):
        media.decode_video(audio_only)


def test_an_hour_of_audio_is_refused_before_decoding(tmp_path):
    path = tmp_path / "hour.flac"
    sf.write(path, np.zeros(3600 * 1000, np.int16), 1000, format="FLAC")  # an hour at 1 kHz: ~0.3 MB
    with pytest.raises(MediaError, match=r"3600\.0 s long; the limit is 30 s"):
        media.decode_audio(path)


def test_limits_are_configuration(mnist, seven, tmp_path):
    px, _ = mnist
    png = _encode_image(Image.fromarray(px[0]), "PNG")
    with pytest.raises(MediaError, match="max_upload_mb"):
        media.decode_image(png, LimitsConfig(max_upload_mb=0.0001))
    with pytest.raises(MediaError, match="max_image_pixels"):
        media.decode_image(png, LimitsConfig(max_image_pixels=100))
    samples, rate = seven
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV")
    with pytest.raises(MediaError, match="max_audio_seconds"):
        media.decode_audio(buf.getvalue(), LimitsConfig(max_audio_seconds=0.1))
    clip = _write_video(_moving_clip(px[1]).numpy(), "avi", "mpeg4")
    with pytest.raises(MediaError, match="max_video_frames"):
        media.decode_video(clip, LimitsConfig(max_video_frames=4))
    with pytest.raises(MediaError, match="does not exist"):
        media.decode_image(tmp_path / "missing.png")


# ---------------------------------------------------------------------------------------- dispatch
def test_guess_modality_and_decode(mnist, tmp_path):
    px, _ = mnist
    for ext, modality in ((".PNG", "image"), (".jpeg", "image"), (".webp", "image"), (".bmp", "image"),
                          (".wav", "audio"), (".flac", "audio"), (".ogg", "audio"), (".mp3", "audio"),
                          (".mp4", "video"), (".webm", "video"), (".avi", "video"), (".txt", "text")):  # fmt: skip
        assert media.guess_modality(f"x{ext}") == modality
    still, moving = tmp_path / "still.gif", tmp_path / "moving.gif"
    Image.fromarray(px[0]).save(still)
    frames = [Image.fromarray(f) for f in _moving_clip(px[0]).numpy()]
    frames[0].save(moving, save_all=True, append_images=frames[1:])
    assert media.guess_modality(still) == "image" and media.guess_modality(moving) == "video"
    assert media.decode(media.guess_modality(moving), moving).shape == (
        VIDEO_FRAMES,
        1,
        VIDEO_SIZE,
        VIDEO_SIZE,
    )
    assert media.decode("text", "  drei ") == "drei"
    with pytest.raises(MediaError, match="extension"):
        media.guess_modality("notes.docx")
    with pytest.raises(MediaError, match="unknown modality"):
        media.decode("smell", b"x")
