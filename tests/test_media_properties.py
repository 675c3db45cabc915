"""Property tests (hypothesis): decoders never fail with anything but MediaError, and always keep the contract."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from workbench.data import media
from workbench.errors import MediaError
from workbench.modalities import IMAGE_SIZE

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEADERS = [b"", b"\x89PNG\r\n\x1a\n", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"OggS", b"ID3\x03", b"GIF89a",
           b"\x00\x00\x00\x18ftypmp42", b"\x1aE\xdf\xa3", b"RIFF\x00\x00\x00\x00AVI ", b"BM", b"\xff\xd8\xff"]  # fmt: skip


@SETTINGS
@given(header=st.sampled_from(HEADERS), body=st.binary(min_size=0, max_size=2048))
@pytest.mark.parametrize("decode", [media.decode_image, media.decode_audio, media.decode_video])
def test_random_bytes_only_raise_media_error(decode, header, body):
    """Garbage, including garbage behind a real magic number, is refused with MediaError or decoded validly."""
    try:
        out = decode(header + body)
    except MediaError as err:
        assert str(err)
        return
    assert torch.isfinite(out).all()  # some garbage is a (noisy) valid stream: then the contract holds


@SETTINGS
@given(
    width=st.integers(1, 400),
    height=st.integers(1, 400),
    mode=st.sampled_from(["L", "RGB", "RGBA", "P", "LA", "1"]),
    fmt=st.sampled_from(["PNG", "JPEG", "WEBP", "BMP", "GIF"]),
    background=st.integers(0, 255),
    seed=st.integers(0, 2**16),
)
def test_any_image_maps_to_the_mnist_contract(width, height, mode, fmt, background, seed):
    """Any size, mode, format and polarity with some stroke on it -> (1, 28, 28) float in [0, 1], ink present."""
    rng = np.random.default_rng(seed)
    ink = 255 - background if abs(255 - 2 * background) > 60 else (background + 128) % 256
    img = Image.new("L", (width, height), background)
    pts = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(3)]
    ImageDraw.Draw(img).line(pts, fill=ink, width=max(1, min(width, height) // 8))
    if mode in ("RGB", "RGBA", "P", "LA", "1"):
        img = img.convert(mode)
    buf = io.BytesIO()
    try:
        img.save(buf, fmt)
    except OSError:  # this format cannot store this mode (e.g. LA as BMP): store it as RGB
        buf = io.BytesIO()
        img.convert("RGB").save(buf, fmt)
    try:
        x = media.decode_image(buf.getvalue())
    except MediaError as err:  # only a stroke that vanished (e.g. 1-px line lost in JPEG) may be "blank"
        assert "blank" in str(err)
        return
    assert x.shape == (1, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.5


@SETTINGS
@given(text=st.text(max_size=300))
def test_text_is_normalised_idempotently(text):
    try:
        out = media.decode_text(text)
    except MediaError as err:
        assert "empty" in str(err)
        return
    assert out == out.strip() and "  " not in out and media.decode_text(out) == out
