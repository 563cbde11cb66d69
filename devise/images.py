"""Image decoding: any file a user has -> RGB pixels, or one clear reason why not."""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from devise.errors import DeviseError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

# Refuse decompression bombs explicitly instead of relying on Pillow's global default.
MAX_PIXELS = 89_478_485
# Truncated files are errors, never half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(DeviseError, ValueError):
    """A file that cannot be turned into an RGB image; str() is the reason."""


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension devise reads."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode (CMYK, L, P, RGBA, LA, I;16, I, F, 1) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: scale the real value range into 0..255.
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on white, as an image viewer shows them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes | str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode bytes or a path into an RGB PIL image (EXIF orientation applied).

    Raises ImageDecodeError with a one-line reason for missing, empty, truncated, non-image
    and oversized files.
    """
    if not isinstance(data, (bytes, bytearray)):
        data = read_file_bytes(data)
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large ({width}x{height} pixels, limit {max_pixels}): "
                    "possible decompression bomb"
                )
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"image too large: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001, S110 -- a broken EXIF block must not lose a fine image
        pass
    return _to_rgb(img)


def read_file_bytes(path: str | os.PathLike) -> bytes:
    """Read a regular file's bytes; ImageDecodeError when it is missing, unreadable, or not a
    regular file (opened without blocking, so a FIFO or device never hangs the reader)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageDecodeError("file does not exist") from None
    except IsADirectoryError:
        raise ImageDecodeError("it is a folder, not an image file") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot read file: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ImageDecodeError("it is a folder, not an image file")
        if not stat.S_ISREG(mode):
            raise ImageDecodeError("not a regular file (a FIFO, socket or device)")
        os.set_blocking(fd, True)
        try:
            return f.read()
        except OSError as e:
            raise ImageDecodeError(f"cannot read file: {e.strerror or e}") from None
