"""A small, deterministic, Danbooru-shaped demo data set of coloured shapes.

Each post is ``{id}.png`` + ``{id}.json`` (a Danbooru API post object). Tag vocabulary (general tags):
  * ``<shape>`` and ``<colour>_<shape>`` per shape, shapes: circle, square, triangle, star;
  * ``<colour>_background`` per background colour, plus ``two-tone_background`` for split backgrounds;
  * ``1shape`` / ``2shapes``;
colours: red, green, blue, yellow, white, black. Shapes never share a colour with the background, and
drawing is not anti-aliased, so every pixel is exactly one of the tagged colours.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from sdswarm.atomic import write_atomic

BUILTIN_DEMO = "builtin:demo"  # data.source naming this data set
GENERATOR_VERSION = 4
MANIFEST = ".manifest.json"  # hidden, so indexing does not see it as an orphan .json
INDEX = "index.db"  # beside the files: the mother serves both, so a joiner needs nothing else

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (255, 255, 255),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
# (width, height), weight: about 70 % in the square bucket, as the demo's prompts are sampled, plus portrait/landscape
# and larger ones for bucketing. A UNet learns where a shape's outline goes from the picture's edges, one bucket's
# canvas at a time: with 57 % of the posts in non-square buckets (generator version 3) the demo drew 1 to 3 of its 4
# prompts' shapes after 1050 steps (0 to 1 after 700), with 29 % 3 of 4 and a star the check misses.
SizeWeights = tuple[tuple[tuple[int, int], int], ...]  # ((width, height), weight), ...
SIZES: SizeWeights = (
    ((64, 64), 22),
    ((48, 96), 2),
    ((96, 48), 2),
    ((64, 96), 1),
    ((96, 64), 1),
    ((128, 128), 2),
    ((96, 160), 1),
    ((160, 96), 1),
)
HIGHRES_SIDE = 128  # demo convention for the "highres" meta tag
STAR_INNER = 0.4  # inner/outer radius of the star; thin enough to tell apart from a triangle
# A shape's circumradius and its offset from its cell's centre, as shares of the cell's side. A model trained for
# minutes draws about the mean of the pictures a prompt stands for: shapes anywhere in the picture (offsets up to a
# sixth of the side, generator version 2) averaged to blobs; centred ones keep their outline.
RADIUS = (0.34, 0.40)
JITTER = 0.03
# Shares of posts with two shapes / a two-tone background: enough to tag and bucket them, few enough that a
# model trained for minutes learns what most posts (and the demo's prompts) are, one shape on one colour.
TWO_SHAPES = 0.1
TWO_TONE = 0.1
# 120 one-shape combinations of shape, colour and background: at 240 posts a fifth of them never occurs and the demo
# draws an unseen prompt ("yellow star" on black) in the colour it saw most (white); at 1200 each occurs ~8 times.
DEMO_POSTS = 1200


@dataclass(frozen=True)
class ShapeSpec:
    kind: str
    colour: str
    cx: int
    cy: int
    r: int  # circumradius


@dataclass(frozen=True)
class PostSpec:
    post_id: int
    width: int
    height: int
    background: tuple[str, ...]  # one colour, or two for a two-tone background
    split: str  # "vertical" (left/right) or "horizontal" (top/bottom); meaningful for two-tone only
    shapes: tuple[ShapeSpec, ...]

    def general_tags(self) -> list[str]:
        tags = {f"{c}_background" for c in self.background}
        if len(self.background) == 2:
            tags.add("two-tone_background")
        for s in self.shapes:
            tags |= {s.kind, f"{s.colour}_{s.kind}"}
        tags.add("1shape" if len(self.shapes) == 1 else "2shapes")
        return sorted(tags)  # Danbooru lists tags alphabetically

    def meta_tags(self) -> list[str]:
        return ["highres"] if max(self.width, self.height) >= HIGHRES_SIDE else []


def plan_post(post_id: int, seed: int, sizes_weights: SizeWeights = SIZES) -> PostSpec:
    """The drawing parameters of one post; independent of the data set size."""
    rng = random.Random(f"sdswarm-demo:{seed}:{post_id}")  # str seeds hash with sha512: stable everywhere
    sizes, weights = zip(*sizes_weights, strict=True)
    width, height = rng.choices(sizes, weights)[0]
    n_shapes = 2 if rng.random() < TWO_SHAPES else 1
    shape_colours = rng.sample(list(COLOURS), n_shapes) if n_shapes == 2 else [rng.choice(list(COLOURS))]
    free = [c for c in COLOURS if c not in shape_colours]
    background = tuple(rng.sample(free, 2)) if rng.random() < TWO_TONE else (rng.choice(free),)
    split = rng.choice(("vertical", "horizontal"))
    # Two shapes get one half each, cut across the long side, so they never overlap.
    if n_shapes == 1:
        cells = [(0, 0, width, height)]
    elif width > height or (width == height and rng.random() < 0.5):
        cells = [(0, 0, width // 2, height), (width // 2, 0, width - width // 2, height)]
    else:
        cells = [(0, 0, width, height // 2), (0, height // 2, width, height - height // 2)]
    shapes = []
    for colour, (x0, y0, cw, ch) in zip(shape_colours, cells, strict=True):
        r = round(rng.uniform(*RADIUS) * min(cw, ch))
        jx, jy = (max(min(round(JITTER * side), side // 2 - r - 2), 0) for side in (cw, ch))  # whole in its cell
        cx = x0 + cw // 2 + round(rng.uniform(-jx, jx))
        cy = y0 + ch // 2 + round(rng.uniform(-jy, jy))
        shapes.append(ShapeSpec(rng.choice(SHAPES), colour, cx, cy, r))
    return PostSpec(post_id, width, height, background, split, tuple(shapes))


def _shape_points(s: ShapeSpec) -> list[tuple[float, float]]:
    if s.kind == "triangle":
        angles, radii = [-90, 30, 150], [s.r] * 3
    elif s.kind == "star":
        angles = [-90 + 36 * i for i in range(10)]
        radii = [s.r if i % 2 == 0 else s.r * STAR_INNER for i in range(10)]
    else:
        raise ValueError(s.kind)
    return [
        (s.cx + r * math.cos(math.radians(a)), s.cy + r * math.sin(math.radians(a)))
        for a, r in zip(angles, radii, strict=True)
    ]


def render(spec: PostSpec) -> Image.Image:
    img = Image.new("RGB", (spec.width, spec.height), COLOURS[spec.background[0]])
    draw = ImageDraw.Draw(img)
    if len(spec.background) == 2:
        box = (
            (spec.width // 2, 0, spec.width, spec.height)
            if spec.split == "vertical"
            else (0, spec.height // 2, spec.width, spec.height)
        )
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=COLOURS[spec.background[1]])
    for s in spec.shapes:
        draw_shape(draw, s, COLOURS[s.colour])
    return img


def draw_shape(draw: ImageDraw.ImageDraw, s: ShapeSpec, fill: tuple[int, int, int] | int) -> None:
    if s.kind == "circle":
        draw.ellipse((s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r), fill=fill)
    elif s.kind == "square":
        h = round(s.r * 0.8)  # a square of the same circumradius looks too big next to the others
        draw.rectangle((s.cx - h, s.cy - h, s.cx + h, s.cy + h), fill=fill)
    else:
        draw.polygon(_shape_points(s), fill=fill)


def post_json(spec: PostSpec, md5: str) -> dict[str, Any]:
    general, meta = spec.general_tags(), spec.meta_tags()
    return {
        "id": spec.post_id,
        "md5": md5,
        "file_ext": "png",
        "image_width": spec.width,
        "image_height": spec.height,
        "rating": "g",
        "tag_string": " ".join(sorted([*general, "original", "sdswarm_demo", *meta])),
        "tag_string_general": " ".join(general),
        "tag_string_character": "",
        "tag_string_copyright": "original",
        "tag_string_artist": "sdswarm_demo",
        "tag_string_meta": " ".join(meta),
        # .invalid is reserved: the URL has Danbooru's layout but can never resolve to someone's server.
        "file_url": f"https://cdn.sdswarm-demo.invalid/original/{md5[:2]}/{md5[2:4]}/{md5}.png",
    }


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(root: Path, count: int, seed: int) -> bool:
    m = _read_manifest(root)
    if m != {"generator": "sdswarm-demo", "version": GENERATOR_VERSION, "count": count, "seed": seed}:
        return False
    return all((root / f"{i}{ext}").is_file() for i in range(1, count + 1) for ext in (".png", ".json"))


def make_demo_dataset(root: Path, count: int = DEMO_POSTS, seed: int = 0) -> Path:
    """Write posts 1..count into root (idempotent: a complete set with the same count/seed is kept)."""
    root = Path(root)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if _is_complete(root, count, seed):
        return root
    root.mkdir(parents=True, exist_ok=True)
    old = _read_manifest(root)
    # Drop the manifest first: an interrupted regeneration must not look complete.
    (root / MANIFEST).unlink(missing_ok=True)
    if old and isinstance(old.get("count"), int):
        for i in range(count + 1, old["count"] + 1):  # posts a bigger earlier set left behind
            for ext in (".png", ".json"):
                (root / f"{i}{ext}").unlink(missing_ok=True)
    for post_id in range(1, count + 1):
        spec = plan_post(post_id, seed)
        buf = io.BytesIO()
        render(spec).save(buf, format="PNG")  # Pillow writes no timestamps: bytes depend on pixels only
        png = buf.getvalue()
        post = post_json(spec, hashlib.md5(png, usedforsecurity=False).hexdigest())
        write_atomic(root / f"{post_id}.png", png)
        write_atomic(root / f"{post_id}.json", (json.dumps(post, indent=2) + "\n").encode())
    manifest = {"generator": "sdswarm-demo", "version": GENERATOR_VERSION, "count": count, "seed": seed}
    write_atomic(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return root


def make_demo_index(root: Path, count: int = DEMO_POSTS, seed: int = 0) -> Path:
    """The demo as a real bucket: the files (made if needed) plus their index db, rebuilt when stale."""
    from sdswarm.data.index import Index, build_from_folder  # the demo files alone need no index code

    root = make_demo_dataset(root, count, seed)
    index = root / INDEX
    if index.is_file() and index.stat().st_mtime >= (root / MANIFEST).stat().st_mtime:
        try:
            with Index(index) as existing:
                if existing.size == count and existing.meta.get("source") == str(root.resolve()):
                    return index
        except ValueError:
            pass  # unreadable or an older layout: build it again
    build_from_folder(root, index)
    return index
