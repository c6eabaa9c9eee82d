"""Image decoding: bytes -> 8-bit RGB PIL image, with the conversions real corpora need.

Grayscale, palette, CMYK, alpha and 16-bit/float images are converted; EXIF orientation
is applied; images whose declared pixel count is past a limit are refused before their
pixels are decoded (decompression bombs). DICOM files (the ``DICM`` preamble) are read by
:mod:`.dicom`, windowed as a radiologist expects.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidImage, ResourceExhausted

if TYPE_CHECKING:
    from .dicom import Window

# Default limit on width * height, checked from the header before decoding.
DEFAULT_MAX_PIXELS = 50_000_000


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, window: Window | None = None) -> Image.Image:
    """Decode encoded image bytes into an RGB image.

    Args:
        data: the file's bytes (JPEG, PNG, TIFF, BMP, GIF, WebP, DICOM, ...).
        max_pixels: refuse images whose header declares more pixels than this.
        window: for a DICOM file, the window that replaces the file's own (None: its own).

    Returns:
        An 8-bit RGB ``PIL.Image.Image``, EXIF orientation applied.

    Raises:
        InvalidImage: the bytes are empty or not a decodable image.
        ResourceExhausted: the declared size is past ``max_pixels``.
    """
    if not data:
        raise InvalidImage("image bytes are empty: send the encoded file (JPEG, PNG, ...)")
    if data[128:132] == b"DICM":
        from .dicom import render

        return render(data, window=window, max_pixels=max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        # PIL refuses at open() past twice its own limit, before our check can run
        raise ResourceExhausted(f"image refused before decoding: {exc}; the limit is {max_pixels:,} pixels") from None
    except UnidentifiedImageError:
        raise InvalidImage(
            f"{len(data)} bytes that are not a recognised image format: send JPEG, PNG, TIFF, BMP, GIF, WebP or DICOM"
        ) from None
    except (OSError, ValueError) as exc:
        raise InvalidImage(f"image header could not be read ({exc})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ResourceExhausted(
            f"image declares {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}: downscale it before sending"
        )
    try:
        with warnings.catch_warnings():
            # We enforce our own limit above; PIL's own warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as exc:
        raise ResourceExhausted(f"image refused as a decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"image data is truncated or corrupt ({exc})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, 16-bit rescaled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit greyscale (typical of medical images): stretch the actual range
        # to 8 bits; a plain convert("L") would clip everything above 255 to white.
        pixels = np.asarray(image, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        grey = np.clip((pixels - low) * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV: PIL's own conversions are right for these.
    return image.convert("RGB")
