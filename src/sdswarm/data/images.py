"""Safe decoding of untrusted image files into upright RGB.

Sizes are checked from the header before any pixel is decoded (decompression bombs); the content must be the
format its extension names; EXIF orientation is applied; transparency is composited on white; CMYK (through
its ICC profile when it has one), palette, grayscale+alpha and 16-bit images are converted properly. Every
failure is an `ImageRejected` with a short reason to count, never another exception.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

FORMAT_OF_EXT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
IMAGE_EXTS = frozenset(FORMAT_OF_EXT)  # the trainable image types, lower case without the dot
DEFAULT_MAX_PIXELS = 50_000_000
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that turn the picture by 90 degrees
_SRGB = ImageCms.createProfile("sRGB")

# We refuse oversized images ourselves, from the header; Pillow's own warning would only add noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


class ImageRejected(ValueError):
    """An image we will not train on; `reason` is the short, countable cause."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    width: int  # upright, as training sees it
    height: int
    format: str


def _open(source: bytes | Path, ext: str | None, max_pixels: int) -> Image.Image:
    """Open (header only) and check: not empty, a format we train on, the one its extension says, not too
    large, not animated."""
    expected = None
    if ext is not None:
        expected = FORMAT_OF_EXT.get(ext.lower().lstrip("."))
        if expected is None:
            raise ImageRejected(f"file type {ext.lower().lstrip('.')}")
    try:
        empty = not source if isinstance(source, bytes) else Path(source).stat().st_size == 0
    except OSError as exc:
        raise ImageRejected("unreadable", str(exc)) from None
    if empty:
        raise ImageRejected("empty file")
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too large", str(exc)) from None
    except Exception as exc:  # untrusted bytes: any parser error means "not an image we can read"
        reason = "truncated" if _riff_cut_short(source) else "not an image"
        raise ImageRejected(reason, f"{type(exc).__name__}: {exc}") from None
    try:
        _check(image, ext, expected, max_pixels)
    except BaseException:
        image.close()
        raise
    return image


def _riff_cut_short(source: bytes | Path) -> bool:
    # WebP files state their length up front: a short one is a cut download, not a strange format.
    if isinstance(source, bytes):
        head = source[:12]
    else:
        with open(source, "rb") as handle:
            head = handle.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return False
    size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
    return int.from_bytes(head[4:8], "little") + 8 > size


def _check(image: Image.Image, ext: str | None, expected: str | None, max_pixels: int) -> None:
    if expected is not None and image.format != expected:
        raise ImageRejected("extension mismatch", f".{ext} holds {image.format}")
    if image.format not in FORMAT_OF_EXT.values():
        raise ImageRejected(f"file type {str(image.format).lower()}")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected("too large", f"{width}x{height}")
    if width < 1 or height < 1:
        raise ImageRejected("corrupt", f"{width}x{height}")
    try:
        frames = getattr(image, "n_frames", 1)
    except Exception as exc:
        raise ImageRejected("corrupt", f"{type(exc).__name__}: {exc}") from None
    if frames > 1:
        raise ImageRejected("animated")


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block only costs us the orientation
        return 1


def probe(source: bytes | Path, ext: str | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Upright size and format from the header alone (no pixel decoding)."""
    with _open(source, ext, max_pixels) as image:
        width, height = image.size
        if _orientation(image) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        return ImageInfo(width, height, image.format or "")


def decode(
    source: bytes | Path,
    ext: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cover: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode fully (truncation and corruption show up here) into an upright RGB image.

    `cover`: the size the caller will scale the image to cover; a JPEG may then be decoded at 1/2 to 1/8
    scale directly (libjpeg's DCT scaling), which still reads every byte of it."""
    return _decode(source, ext, max_pixels, cover)[0]


def check(source: bytes | Path, ext: str | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Everything `decode` checks, at the least cost (JPEGs at 1/8 scale), plus PNG's chunk checksums
    (damage inside the compressed data can decode without error); the full upright size."""
    info = _decode(source, ext, max_pixels, cover=(1, 1))[1]
    if info.format == "PNG":
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                image.verify()
        except Exception as exc:
            raise ImageRejected("corrupt", f"{type(exc).__name__}: {exc}") from None
    return info


def _decode(
    source: bytes | Path, ext: str | None, max_pixels: int, cover: tuple[int, int] | None
) -> tuple[Image.Image, ImageInfo]:
    image = _open(source, ext, max_pixels)
    orientation = _orientation(image)
    w, h = image.size
    swapped = orientation in _SWAPPING_ORIENTATIONS
    info = ImageInfo(h, w, image.format or "") if swapped else ImageInfo(w, h, image.format or "")
    if cover is not None and image.format == "JPEG":
        cw, ch = cover[::-1] if swapped else cover
        scale = max(cw / w, ch / h)
        if scale < 0.5:
            image.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
    try:
        image.load()
    except Exception as exc:  # untrusted bytes: report, never crash
        image.close()
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageRejected(reason, f"{type(exc).__name__}: {exc}") from None
    if orientation != 1:
        with contextlib.suppress(Exception):  # an unusable orientation tag: keep the pixels as stored
            image = ImageOps.exif_transpose(image)
    try:
        return to_rgb(image), info
    except Exception as exc:
        raise ImageRejected("corrupt", f"{type(exc).__name__}: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded mode -> RGB; transparency composited on white."""
    if image.mode.startswith("I"):  # 16/32-bit grayscale: scale down instead of clipping at 255
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "CMYK" and image.info.get("icc_profile"):
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
            image = ImageCms.profileToProfile(image, profile, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # an unusable profile: Pillow's plain conversion below is still close
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")
