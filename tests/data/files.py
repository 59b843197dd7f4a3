"""Image files and Danbooru posts the data tests build themselves, good and bad."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

from PIL import Image


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def solid(fmt: str = "PNG", size: tuple[int, int] = (8, 6), colour: str | tuple = "red", mode: str = "RGB") -> bytes:
    return encode(Image.new(mode, size, colour), fmt)


def noisy_jpeg(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    # Noise does not compress: the entropy-coded data spans the whole file, so cutting it shows.
    rand = Image.frombytes("RGB", size, hashlib.shake_256(str(seed).encode()).digest(size[0] * size[1] * 3))
    return encode(rand, "JPEG", quality=90)


def left_red_right_blue(size: tuple[int, int] = (40, 20)) -> Image.Image:
    image = Image.new("RGB", size, "blue")
    image.paste("red", (0, 0, size[0] // 2, size[1]))
    return image


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """40x20 stored (red left, blue right), with an EXIF tag saying: turn it upright."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(left_red_right_blue(), "JPEG", exif=exif.tobytes(), quality=95)


def palette_with_transparency() -> bytes:
    """16x8 palette PNG: left half transparent (index 0), right half opaque green (index 1)."""
    image = Image.new("P", (16, 8), 1)
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * (256 * 3 - 6))
    image.paste(0, (0, 0, 8, 8))
    return encode(image, "PNG", transparency=0)


def grey_alpha() -> bytes:
    image = Image.new("LA", (8, 8), (0, 255))
    image.paste((0, 0), (0, 0, 4, 8))  # left half fully transparent black
    return encode(image, "PNG")


def cmyk_jpeg(rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    return encode(Image.new("RGB", (16, 16), rgb).convert("CMYK"), "JPEG", quality=95)


def grey16_png(value: int = 40000) -> bytes:
    return encode(Image.new("I;16", (8, 8), value), "PNG")


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb, caught before decoding."""
    data = bytearray(solid("PNG", (1, 1)))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def api_post(post_id: int, general: str = "1girl solo", ext: str = "png", image: bytes | None = None,
             **extra) -> dict:
    """A Danbooru API post object; md5 of `image` when given."""
    post = {
        "id": post_id, "file_ext": ext, "image_width": 8, "image_height": 6, "rating": "g", "file_size": 100,
        "md5": hashlib.md5(image).hexdigest() if image is not None else f"{post_id:032x}",
        "tag_string": general, "tag_string_general": general, "tag_string_character": "",
        "tag_string_copyright": "original", "tag_string_artist": "someone", "tag_string_meta": "highres",
        "file_url": f"https://cdn.example.invalid/{post_id}.{ext}",
    }
    post.update(extra)
    return post


def write_pair(folder: Path, post_id: int, image: bytes, ext: str = "png", general: str = "1girl solo",
               post: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{post_id}.{ext}").write_bytes(image)
    meta = post if post is not None else api_post(post_id, general, ext, image)
    (folder / f"{post_id}.json").write_text(json.dumps(meta))
