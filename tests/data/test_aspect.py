"""Aspect-ratio buckets, checked against hand-computed expectations."""

import math

import pytest
from PIL import Image

from sdswarm.data.aspect import (
    AspectBatchSampler,
    AspectBucket,
    aspect_bucket_table,
    assign_aspect_bucket,
    make_aspect_buckets,
    resize_to_aspect_bucket,
)

B = AspectBucket


def test_make_buckets_512():
    # By hand: sides 256..512 step 64, area <= 512*512, ratio <= 2. Every width w in {256,...,512} fits height
    # 512 (w*512 <= 512*512, 512/w <= 2), and symmetrically every height fits width 512.
    assert make_aspect_buckets(512, 256, 512) == [
        B(256, 512), B(320, 512), B(384, 512), B(448, 512),
        B(512, 512),
        B(512, 448), B(512, 384), B(512, 320), B(512, 256),
    ]  # fmt: skip


def test_make_buckets_ratio_limits_and_dropped_side():
    # Sides {32, 64, 96}, area <= 4096: w=32 -> h=64 (h=96 breaks 2:1); w=64 -> h=64 (area);
    # w=96 -> area allows only h=32, ratio 3:1 > 2 -> no bucket with a 96 side at all.
    assert make_aspect_buckets(64, 32, 96, step=32) == [B(32, 64), B(64, 64), B(64, 32)]


def test_make_buckets_adds_square_when_rule_skips_it():
    # resolution 500, area <= 250000, sides 256..576:
    # w=256 -> 512 (ratio), w=320 -> 576 (side_max), w=384 -> 576, w=448 -> 512 (558 floor),
    # w=512 -> 448 (488), w=576 -> 384 (434); plus mirrors. 448x448 is no "largest height" of any width,
    # but it is the square of the largest side <= 500 and must be added.
    assert make_aspect_buckets(500, 256, 576) == [
        B(256, 512), B(320, 576), B(384, 576), B(448, 512),
        B(448, 448),
        B(512, 448), B(576, 384), B(576, 320), B(512, 256),
    ]  # fmt: skip


def test_make_buckets_max_ratio():
    # max_ratio 1.5, sides {128, 192, 256}, area <= 65536: 128 -> 192; 192 -> 256 (ratio 1.33); 256 -> 256.
    assert make_aspect_buckets(256, 128, 256, max_ratio=1.5) == [
        B(128, 192), B(192, 256), B(256, 256), B(256, 192), B(192, 128),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args, match",
    [
        ((512, 512, 256), "side_min"),
        ((512, 250, 512), "multiples"),
        ((512, 256, 500), "multiples"),
        ((128, 256, 512), "no bucket fits"),
    ],
)
def test_make_buckets_errors(args, match):
    with pytest.raises(ValueError, match=match):
        make_aspect_buckets(*args)


def test_aspect():
    assert B(512, 256).aspect == 2.0
    assert B(256, 512).aspect == 0.5


@pytest.mark.parametrize(
    "size, expected",
    [
        ((1000, 500), B(512, 256)),
        ((500, 1000), B(256, 512)),
        ((640, 480), B(512, 384)),
        ((480, 640), B(384, 512)),
        ((1024, 1024), B(512, 512)),
        ((4000, 1000), B(512, 256)),  # beyond the widest bucket: clamps to it
        # 1.778: |ln1.778 - ln1.6| = 0.105 < |ln1.778 - ln2| = 0.118
        ((1920, 1080), B(512, 320)),
        # 1.2: |ln1.2 - ln(8/7)| = 0.049 < ln1.2 = 0.182
        ((600, 500), B(512, 448)),
    ],
)
def test_assign_bucket(size, expected):
    assert assign_aspect_bucket(*size, make_aspect_buckets(512, 256, 512)) == expected


def test_assign_bucket_uses_log_space():
    # Aspect 0.72 vs buckets 0.5 and 1.0: linear distance picks 0.5 (0.22 < 0.28), log picks 1.0
    # (|ln 0.72| = 0.329 < |ln 0.72 - ln 0.5| = 0.365).
    assert assign_aspect_bucket(720, 1000, [B(64, 128), B(128, 128)]) == B(128, 128)


def test_assign_bucket_tie_prefers_larger_area():
    # A square image is equally far (ln 2) from 2:1 and 1:2 in log space; 192x96 has the larger area.
    # (In linear space 1:2 would win, |0.5 - 1| < |2 - 1|.)
    assert assign_aspect_bucket(100, 100, [B(64, 128), B(192, 96)]) == B(192, 96)
    assert assign_aspect_bucket(100, 100, [B(64, 64), B(128, 128)]) == B(128, 128)


def _close(pixel, colour, tol=12):
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour, strict=True))


RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def test_resize_center_crop_horizontal():
    # 300x200, thirds red|green|blue. Cover 128x128: scale max(128/300, 128/200) = 0.64 -> 192x128;
    # stripes at x [0,64) [64,128) [128,192); crop x [32,160) -> red [0,32), green [32,96), blue [96,128).
    img = Image.new("RGB", (300, 200))
    for i, c in enumerate((RED, GREEN, BLUE)):
        img.paste(c, (100 * i, 0, 100 * (i + 1), 200))
    out = resize_to_aspect_bucket(img, B(128, 128))
    assert out.size == (128, 128) and out.mode == "RGB"
    for y in (5, 64, 122):
        assert _close(out.getpixel((10, y)), RED)
        assert _close(out.getpixel((64, y)), GREEN)
        assert _close(out.getpixel((117, y)), BLUE)
    # The red/green edge sits at x=32 (an uncentred crop would put it at 0 or 64).
    assert _close(out.getpixel((28, 64)), RED) and _close(out.getpixel((36, 64)), GREEN)


def test_resize_center_crop_vertical_marked_center():
    # 200x400 -> cover 128x128: scale max(0.64, 0.32) = 0.64 -> 128x256, crop y [64, 192). Bands red y<100,
    # green 100..300, blue >=300 scale to red <64, green 64..192, blue >=192: the crop is all green, with the
    # black centre mark in its middle.
    img = Image.new("RGB", (200, 400), GREEN)
    img.paste(RED, (0, 0, 200, 100))
    img.paste(BLUE, (0, 300, 200, 400))
    img.paste((0, 0, 0), (90, 190, 110, 210))  # 20x20 centre mark -> about 13x13 at the output centre
    out = resize_to_aspect_bucket(img, B(128, 128))
    assert out.size == (128, 128)
    for xy in [(64, 4), (64, 123), (4, 64), (123, 64), (10, 10), (117, 117)]:
        assert _close(out.getpixel(xy), GREEN), xy
    assert max(out.getpixel((64, 64))) < 20
    # Mark spans 128 * [90, 110) / 200 = [57.6, 70.4) in x, same in y after the 64-row crop.
    assert _close(out.getpixel((50, 64)), GREEN, tol=40) and _close(out.getpixel((78, 64)), GREEN, tol=40)


def test_resize_non_rgb_and_alpha():
    gray = Image.new("L", (40, 20), 128)
    out = resize_to_aspect_bucket(gray, B(32, 32))
    assert out.mode == "RGB" and out.size == (32, 32)
    assert out.getpixel((16, 16)) == (128, 128, 128)
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert resize_to_aspect_bucket(clear, B(32, 32)).getpixel((16, 16)) == WHITE


def test_resize_upscale_exact_size():
    out = resize_to_aspect_bucket(Image.new("RGB", (33, 77)), B(448, 512))
    assert out.size == (448, 512)


# Items: bucket A (64x64) has 10, B (64x32) has 3, C (32x64) has 1; batch size 4.
A_, B_, C_ = B(64, 64), B(64, 32), B(32, 64)
ITEMS = [A_, B_, A_, A_, C_, A_, B_, A_, A_, A_, B_, A_, A_, A_]
A_IDX, B_IDX, C_IDX = [0, 2, 3, 5, 7, 8, 9, 11, 12, 13], [1, 6, 10], [4]


def test_sampler_no_shuffle_exact():
    s = AspectBatchSampler(ITEMS, batch_size=4, shuffle=False, seed=0)
    # Buckets by aspect (C 0.5, A 1, B 2); remainders topped up from the start of the same bucket.
    expected = [[4, 4, 4, 4], [0, 2, 3, 5], [7, 8, 9, 11], [12, 13, 0, 2], [1, 6, 10, 1]]
    assert s.batches(0) == expected
    assert s.batches(7) == expected
    assert len(s) == 5
    assert s.counts() == {C_: 1, A_: 10, B_: 3}


def test_sampler_shuffle_properties():
    s = AspectBatchSampler(ITEMS, batch_size=4, shuffle=True, seed=123)
    for epoch in range(20):
        batches = s.batches(epoch)
        assert len(batches) == 5  # ceil(10/4) + ceil(3/4) + ceil(1/4)
        assert all(len(b) == 4 for b in batches)
        assert all(len({ITEMS[i] for i in b}) == 1 for b in batches)  # one bucket per batch
        assert {i for b in batches for i in b} == set(range(len(ITEMS)))  # nothing lost, remainders included
        for idx in (A_IDX, B_IDX):
            members = set(idx)
            bucket_batches = [b for b in batches if set(b) <= members]
            assert len(bucket_batches) == math.ceil(len(idx) / 4)
            # With >= batch_size items the top-up uses other items: no repeats inside a batch.
            if len(idx) >= 4:
                assert all(len(set(b)) == 4 for b in bucket_batches)
            # Every item at least once; the top-up adds exactly (n_batches*4 - n) extra draws.
            flat = [i for b in bucket_batches for i in b]
            assert set(flat) == members and len(flat) == 4 * math.ceil(len(idx) / 4)


def test_sampler_deterministic_and_epoch_dependent():
    s1 = AspectBatchSampler(ITEMS, batch_size=4, shuffle=True, seed=7)
    s2 = AspectBatchSampler(list(ITEMS), batch_size=4, shuffle=True, seed=7)
    assert s1.batches(3) == s2.batches(3)
    epochs = [s1.batches(e) for e in range(5)]
    assert len({str(b) for b in epochs}) == 5
    assert AspectBatchSampler(ITEMS, 4, True, seed=8).batches(3) != s1.batches(3)
    s1.set_epoch(3)
    assert list(s1) == s2.batches(3)


def test_sampler_batch_order_mixes_buckets():
    items = [A_] * 40 + [B_] * 40
    s = AspectBatchSampler(items, batch_size=4, shuffle=True, seed=0)
    firsts = [items[b[0]] for b in s.batches(0)]
    # Unshuffled it would be 10 A-batches then 10 B-batches.
    assert firsts != sorted(firsts, key=lambda b: b.aspect)


def test_bucket_table():
    buckets = make_aspect_buckets(512, 256, 512)
    table = aspect_bucket_table(buckets, {B(512, 256): 3, B(512, 512): 5})
    lines = table.splitlines()
    assert lines[0].split() == ["bucket", "aspect", "count"]
    row = next(line for line in lines if line.startswith("512x256"))
    assert row.split() == ["512x256", "2.000", "3"]
    assert next(line for line in lines if line.startswith("256x512")).split() == ["256x512", "0.500", "0"]
    assert lines[-1].split() == ["total", "8"]
    assert len([line for line in lines if "x" in line.split()[0]]) == 9
