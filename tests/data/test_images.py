import io

import numpy as np
import pytest
from PIL import Image

from sdswarm.data.images import ImageRejected, check, decode, probe
from tests.data import files


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in image.getpixel(xy))


@pytest.mark.parametrize(("fmt", "ext"), [("JPEG", "jpg"), ("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp")])
def test_good_files_decode_to_rgb(fmt: str, ext: str) -> None:
    image = decode(files.solid(fmt, (8, 6)), ext)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert abs(pixel(image, (4, 3))[0] - 255) < 10


def test_exif_rotation_is_applied_and_probe_reports_the_upright_size(tmp_path) -> None:
    data = files.exif_rotated_jpeg(orientation=6)  # stored 40x20, shown turned 90 degrees clockwise
    image = decode(data, "jpg")
    assert image.size == (20, 40)
    top, bottom = pixel(image, (10, 5)), pixel(image, (10, 35))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the red left half is now on top
    (tmp_path / "r.jpg").write_bytes(data)
    assert (probe(tmp_path / "r.jpg").width, probe(tmp_path / "r.jpg").height) == (20, 40)
    assert (check(data, "jpg").width, check(data, "jpg").height) == (20, 40)


def test_palette_transparency_and_grey_alpha_are_composited_on_white() -> None:
    image = decode(files.palette_with_transparency(), "png")
    assert pixel(image, (2, 4)) == (255, 255, 255) and pixel(image, (12, 4)) == (0, 200, 0)
    grey = decode(files.grey_alpha(), "png")
    assert pixel(grey, (1, 1)) == (255, 255, 255) and pixel(grey, (6, 1)) == (0, 0, 0)


def test_rgba_alpha_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((3, 3), (0, 0, 255, 255))
    image = decode(files.encode(rgba, "PNG"), "png")
    assert pixel(image, (0, 0)) == (255, 255, 255) and pixel(image, (3, 3)) == (0, 0, 255)


def test_cmyk_jpeg_keeps_its_colour() -> None:
    image = decode(files.cmyk_jpeg((200, 30, 30)), "jpg")
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=int)[8, 8] - [200, 30, 30]).max() < 12


def test_cmyk_with_an_unusable_icc_profile_still_decodes() -> None:
    data = files.encode(Image.new("CMYK", (8, 8), (0, 200, 200, 0)), "JPEG", icc_profile=b"not a profile")
    assert decode(data, "jpg").mode == "RGB"


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    image = decode(files.grey16_png(40000), "png")
    assert pixel(image, (0, 0)) == (156, 156, 156)  # 40000 / 65535 * 255; clipping would give 255


@pytest.mark.parametrize(
    ("data", "ext", "reason"),
    [
        (b"", "png", "empty file"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "png", "not an image"),
        (b"hello, not an image at all", "jpg", "not an image"),
        (files.solid("PNG"), "jpg", "extension mismatch"),
        (files.solid("JPEG"), "webp", "extension mismatch"),
        (files.animated("GIF"), "gif", "file type gif"),
        (files.animated("GIF"), "png", "extension mismatch"),
        (files.animated("PNG"), "png", "animated"),
        (files.animated("WEBP"), "webp", "animated"),
        (files.solid("PNG"), "avif", "file type avif"),
        (files.png_claiming_size(30000, 30000), "png", "too large"),
    ],
)
def test_bad_files_are_rejected_with_a_reason(data: bytes, ext: str, reason: str) -> None:
    with pytest.raises(ImageRejected) as caught:
        decode(data, ext)
    assert caught.value.reason == reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_files_are_rejected(fmt: str) -> None:
    whole = files.encode(Image.open(io.BytesIO(files.noisy_jpeg((64, 48)))), fmt)
    for cut in (whole[: len(whole) // 3], whole[: len(whole) * 19 // 20]):
        for run in (decode, check):  # the cheap check finds it too
            with pytest.raises(ImageRejected) as caught:
                run(cut, fmt.lower())
            assert caught.value.reason == "truncated"


def test_damage_inside_png_data_is_rejected() -> None:
    # PNG carries checksums; JPEG and WebP have none (libjpeg shrugs off some damage): there the md5 from
    # the metadata is what catches a damaged file (see test_bucket.py).
    data = bytearray(files.encode(Image.open(io.BytesIO(files.noisy_jpeg((64, 48)))), "PNG"))
    data[len(data) // 2 : len(data) // 2 + 50] = b"\xff" * 50
    with pytest.raises(ImageRejected, match="corrupt"):
        check(bytes(data), "png")


def test_truncated_jpeg_is_named_truncated_even_when_drafted() -> None:
    whole = files.noisy_jpeg((256, 192))
    for cover in (None, (32, 24)):
        with pytest.raises(ImageRejected, match="truncated"):
            decode(whole[: len(whole) // 2], "jpg", cover=cover)


def test_pixel_limit_is_checked_before_decoding() -> None:
    assert decode(files.solid("PNG", (100, 100)), "png", max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageRejected, match="too large"):
        decode(files.solid("PNG", (100, 101)), "png", max_pixels=10_000)


def test_cover_decodes_big_jpegs_smaller_but_large_enough() -> None:
    data = files.noisy_jpeg((640, 480))
    image = decode(data, "jpg", cover=(64, 64))
    assert 640 > image.width >= 85 and image.height >= 64  # covers 64x64 with the aspect kept
    assert decode(data, "jpg").size == (640, 480)


def test_files_on_disk(tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(files.solid("PNG", (5, 7)))
    (tmp_path / "empty.png").write_bytes(b"")
    assert decode(tmp_path / "a.png", "png").size == (5, 7)
    with pytest.raises(ImageRejected, match="empty file"):
        probe(tmp_path / "empty.png")
    with pytest.raises(ImageRejected, match="unreadable"):
        probe(tmp_path / "missing.png")
