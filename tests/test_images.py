"""Image decoding: every mode real corpora contain ends as 8-bit RGB, bad bytes are refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from xmodal.indexer.errors import InvalidImage, ResourceExhausted
from xmodal.indexer.images import decode_image


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def test_grayscale_becomes_rgb_with_same_levels():
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    out = decode_image(encode(grey))
    assert out.mode == "RGB" and out.size == (16, 16)
    assert np.array_equal(np.asarray(out)[..., 0], np.asarray(grey))


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    image.info["transparency"] = 0
    out = decode_image(encode(image))
    assert out.mode == "RGB"
    assert tuple(np.asarray(out)[0, 0]) == (255, 255, 255)


def test_cmyk_jpeg_is_converted():
    cmyk = Image.new("CMYK", (10, 10), (0, 255, 255, 0))  # red in CMYK
    out = decode_image(encode(cmyk, "JPEG"))
    r, g, b = np.asarray(out)[5, 5]
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16bit_greyscale_is_rescaled_not_clipped():
    values = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit data in 16 bits
    out = np.asarray(decode_image(encode(Image.fromarray(values))))[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert 100 < out[32, 32] < 160  # mid-range stays mid-grey instead of saturating


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


@pytest.mark.parametrize("data", [b"", b"not an image at all", encode(Image.new("RGB", (50, 50)), "PNG")[:60]])
def test_undecodable_bytes_raise_invalid_image(data):
    with pytest.raises(InvalidImage) as info:
        decode_image(data)
    assert str(info.value)


def test_pixel_limit_is_checked_before_decoding():
    big = encode(Image.new("L", (3000, 3000)))
    with pytest.raises(ResourceExhausted, match="9,000,000 pixels"):
        decode_image(big, max_pixels=1_000_000)


def test_huge_declared_size_is_refused_not_crashed():
    """A 30000x30000 header made PIL raise DecompressionBombError from open(), which
    escaped as an internal error (found by the fuzz test)."""
    from test_fuzz import png_declaring

    with pytest.raises(ResourceExhausted, match="pixels"):
        decode_image(png_declaring(30000, 30000))
