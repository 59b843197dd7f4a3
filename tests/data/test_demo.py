import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from sdswarm.data.captions import caption_from_post
from sdswarm.data.demo import COLOURS, INDEX, make_demo_dataset, make_demo_index
from sdswarm.data.index import Index

SHAPES = ("circle", "square", "triangle", "star")
# Filled fraction of the bounding box, measured independently of the generator's geometry.
FILL = {"square": 1.0, "circle": 0.785, "triangle": 0.5, "star": 0.35}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), count=240, seed=0)


def load(root: Path, post_id: int) -> tuple[dict, Image.Image]:
    post = json.loads((root / f"{post_id}.json").read_text())
    return post, Image.open(root / f"{post_id}.png").convert("RGB")


def colours_in_tags(general: list[str]) -> tuple[set[str], set[str]]:
    shape_cols = {t.split("_")[0] for t in general if t.split("_")[-1] in SHAPES and "_" in t}
    bg_cols = {t.split("_")[0] for t in general if t.endswith("_background") and t != "two-tone_background"}
    return shape_cols, bg_cols


def test_posts_are_danbooru_shaped_and_match_their_images(demo: Path) -> None:
    for i in range(1, 241):
        raw = (demo / f"{i}.png").read_bytes()
        post, img = load(demo, i)
        assert post["id"] == i and post["file_ext"] == "png" and post["rating"] == "g"
        assert post["md5"] == hashlib.md5(raw).hexdigest()
        assert post["file_url"].endswith(f"/{post['md5']}.png")
        assert img.size == (post["image_width"], post["image_height"])
        assert post["tag_string_copyright"] == "original" and post["tag_string_artist"] == "sdswarm_demo"
        assert post["tag_string_character"] == "" and post["tag_string_meta"] in ("", "highres")
        parts = [post[f"tag_string_{c}"] for c in ("general", "character", "copyright", "artist", "meta")]
        assert sorted(post["tag_string"].split()) == sorted(" ".join(parts).split())


def test_colour_tags_are_exactly_the_colours_in_the_picture(demo: Path) -> None:
    names = {rgb: name for name, rgb in COLOURS.items()}
    for i in range(1, 241):
        post, img = load(demo, i)
        general = post["tag_string_general"].split()
        shape_cols, bg_cols = colours_in_tags(general)
        counts = Counter({rgb: n for n, rgb in img.getcolors()})
        assert set(counts) <= set(names), f"post {i}: pixels outside the palette"
        assert {names[c] for c in counts} == shape_cols | bg_cols, f"post {i}: {general}"
        assert len(bg_cols) == (2 if "two-tone_background" in general else 1)
        assert not shape_cols & bg_cols
        n_shapes = 2 if "2shapes" in general else 1
        assert ("1shape" in general) != ("2shapes" in general)
        assert len([t for t in general if "_" in t and t.split("_")[-1] in SHAPES]) == n_shapes
        for c in shape_cols:  # every shape is big enough to see
            assert counts[COLOURS[c]] >= 0.02 * img.width * img.height


def test_shape_tags_match_the_drawn_shape(demo: Path) -> None:
    checked = Counter()
    for i in range(1, 241):
        post, img = load(demo, i)
        general = post["tag_string_general"].split()
        if "2shapes" in general:
            continue
        (kind,) = [t for t in general if t in SHAPES]
        (colour,) = colours_in_tags(general)[0]
        r, g, b = ImageChops.difference(img, Image.new("RGB", img.size, COLOURS[colour])).split()
        mask = ImageChops.lighter(ImageChops.lighter(r, g), b).point(lambda v: 255 if v == 0 else 0)
        x0, y0, x1, y1 = mask.getbbox()
        fill = mask.histogram()[255] / ((x1 - x0) * (y1 - y0))
        nearest = min(FILL, key=lambda k: abs(FILL[k] - fill))
        assert nearest == kind, f"post {i} tagged {kind}, looks like {nearest} (fill {fill:.2f})"
        checked[kind] += 1
    assert set(checked) == set(SHAPES) and min(checked.values()) >= 10


def test_variety_for_bucketing_and_learning(demo: Path) -> None:
    sizes, tags = Counter(), Counter()
    for i in range(1, 241):
        post = json.loads((demo / f"{i}.json").read_text())
        sizes[(post["image_width"], post["image_height"])] += 1
        tags.update(post["tag_string_general"].split())
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes) and any(w == h for w, h in sizes)
    assert len({w / h for w, h in sizes}) >= 4 and max(max(s) for s in sizes) >= 128
    for word in [*SHAPES, *(f"{c}_background" for c in COLOURS), "1shape", "2shapes", "two-tone_background"]:
        assert tags[word] >= 10, word
    assert all(any(t.startswith(f"{c}_") and t.split("_")[1] in SHAPES for t in tags) for c in COLOURS)


def test_captions_come_out_readable(demo: Path) -> None:
    post = json.loads((demo / "1.json").read_text())
    caption = caption_from_post(post)
    assert caption.startswith("original, ") and "_" not in caption.replace("two-tone", "")


def test_same_seed_gives_byte_identical_files_in_different_dirs(demo: Path, tmp_path: Path) -> None:
    other = make_demo_dataset(tmp_path / "a" / "b", count=240, seed=0)
    names = sorted(p.name for p in demo.iterdir())
    assert names == sorted(p.name for p in other.iterdir())
    assert len(names) == 2 * 240 + 1  # pairs + manifest, no leftover temp files
    for name in names:
        assert (demo / name).read_bytes() == (other / name).read_bytes(), name


def test_other_seed_gives_other_pictures(demo: Path, tmp_path: Path) -> None:
    other = make_demo_dataset(tmp_path, count=20, seed=1)
    same = sum((demo / f"{i}.png").read_bytes() == (other / f"{i}.png").read_bytes() for i in range(1, 21))
    assert same < 5


def test_idempotent_and_regenerates_when_incomplete_or_different(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path, count=12)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    time.sleep(0.01)
    make_demo_dataset(tmp_path, count=12)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps  # nothing rewritten

    (tmp_path / "5.png").unlink()  # e.g. a user deleted one
    make_demo_dataset(tmp_path, count=12)
    assert (tmp_path / "5.png").is_file()

    make_demo_dataset(tmp_path, count=8)  # a smaller set must not keep the old extra posts
    posts = sorted(p.name for p in tmp_path.glob("[!.]*.json"))
    assert posts == sorted(f"{i}.json" for i in range(1, 9))
    assert json.loads((tmp_path / ".manifest.json").read_text())["count"] == 8


def test_generation_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_demo_dataset(tmp_path, count=240)
    assert time.perf_counter() - start < 5.0


def test_the_demo_is_a_bucket_with_its_index(tmp_path: Path) -> None:
    index = make_demo_index(tmp_path, count=12)
    assert index == tmp_path / INDEX
    with Index(index) as opened:
        posts = opened.posts_at(range(12))
        assert [p.post_id for p in posts] == list(range(1, 13)) and {p.ext for p in posts} == {"png"}
        assert all(p.md5 == json.loads((tmp_path / f"{p.post_id}.json").read_text())["md5"] for p in posts)
    stamp = index.stat().st_mtime_ns
    assert make_demo_index(tmp_path, count=12).stat().st_mtime_ns == stamp  # up to date: kept
    make_demo_index(tmp_path, count=8)  # the files changed: the index follows
    with Index(index) as opened:
        assert len(opened) == 8
