"""Does a sample grid show its prompts? For a demo prompt ("... blue background, circle, red circle") a person sees
at a glance whether the sample is a red circle on blue; this measures the same without one: the colour of the
sample's centre, that of its border, and which demo shape best fits the outline of its shape-coloured pixels."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from sdswarm.data.demo import COLOURS, SHAPES, ShapeSpec, draw_shape

_SHAPE = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
_BACKGROUND = re.compile(rf"\b({'|'.join(COLOURS)}) background\b")
_SUPERSAMPLE = 4  # shapes are fitted at a quarter pixel
NO_SHAPE = "no shape"


@dataclass(frozen=True)
class Look:
    """What a one-shape demo picture shows: a shape, in a colour, on a background colour."""

    shape: str
    colour: str
    background: str

    def __str__(self) -> str:
        return f"{self.colour} {self.shape} on {self.background}"


@dataclass(frozen=True)
class SampleCheck:
    prompt: str
    want: Look  # what the prompt asks for
    seen: Look  # what the sample shows
    fit: float  # intersection over union of the sample's shape-coloured pixels and the seen shape's outline

    @property
    def colours_ok(self) -> bool:
        return (self.seen.colour, self.seen.background) == (self.want.colour, self.want.background)

    @property
    def shape_ok(self) -> bool:
        return self.seen.shape == self.want.shape

    def describe(self) -> str:
        colours, shape = ("ok" if ok else "MISSED" for ok in (self.colours_ok, self.shape_ok))
        return (f"colours {colours:6} shape {shape:6} {self.prompt!r}: {self.seen} (outline fit {self.fit:.2f}), "
                f"want {self.want}")


def wanted_look(prompt: str) -> Look | None:
    """What a one-shape, one-background demo prompt asks for; None for any other prompt."""
    shapes, backgrounds = _SHAPE.findall(prompt), _BACKGROUND.findall(prompt)
    if len(shapes) != 1 or len(backgrounds) != 1:
        return None
    (colour, shape), background = shapes[0], backgrounds[0]
    return Look(shape, colour, background)


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def outline(kind: str, width: int, height: int, cx: float, cy: float, r: float) -> np.ndarray:
    """The pixels a demo shape of circumradius r centred at (cx, cy) covers by half or more."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    draw_shape(ImageDraw.Draw(canvas), ShapeSpec(kind, "white", round(cx * s), round(cy * s), round(r * s)), 255)
    return np.asarray(canvas.resize((width, height), Image.Resampling.BOX)) >= 128


def best_outline(mask: np.ndarray) -> tuple[str, float]:
    """The demo shape whose outline, centred on the mask's centroid and as large as the mask, overlaps it most,
    and that overlap (intersection over union). Fitting size and place leaves the outline to decide."""
    area = int(mask.sum())
    if area == 0 or area == mask.size:
        return NO_SHAPE, 0.0
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # pixel centres
    fits = {}
    for kind in SHAPES:
        unit = outline(kind, width, height, cx, cy, 16.0)
        r = 16.0 * (area / max(int(unit.sum()), 1)) ** 0.5
        shape = outline(kind, width, height, cx, cy, r)
        fits[kind] = (mask & shape).sum() / (mask | shape).sum()
    kind = max(fits, key=fits.__getitem__)
    return kind, float(fits[kind])


def check_sample(image: Image.Image, prompt: str) -> SampleCheck | None:
    """Centre: the middle square of a quarter of the side each way from the middle (inside every demo shape);
    border: the outer eighth on each side (background: the shapes keep clear of it); shape: the outline of the
    pixels nearer the centre's colour than the border's."""
    want = wanted_look(prompt)
    if want is None:
        return None
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = pixels.shape[:2]
    centre = pixels[3 * height // 8 : 5 * height // 8, 3 * width // 8 : 5 * width // 8].reshape(-1, 3)
    band_h, band_w = max(height // 8, 1), max(width // 8, 1)
    frame = np.ones((height, width), dtype=bool)
    frame[band_h:-band_h, band_w:-band_w] = False
    colour, background = nearest_colour(centre.mean(axis=0)), nearest_colour(pixels[frame].mean(axis=0))
    shape, fit = NO_SHAPE, 0.0
    if colour != background:
        distance = {name: ((pixels - COLOURS[name]) ** 2).sum(axis=2) for name in (colour, background)}
        shape, fit = best_outline(distance[colour] < distance[background])
    return SampleCheck(prompt, want, Look(shape, colour, background), fit)


def check_grid(grid: Image.Image, prompts: Sequence[str], width: int, height: int) -> list[SampleCheck]:
    """The checks of the demo prompts in a grid from render_grid (samples left to right, top to bottom)."""
    columns = max(grid.width // width, 1)
    checks = []
    for index, prompt in enumerate(prompts):
        row, column = divmod(index, columns)
        sample = grid.crop((column * width, row * height, (column + 1) * width, (row + 1) * height))
        if (check := check_sample(sample, prompt)) is not None:
            checks.append(check)
    return checks


def most(passed: Sequence[bool]) -> bool:
    """More than half of the checks passed: `most([c.colours_ok for c in checks])`."""
    return 2 * sum(passed) > len(passed)


def tally(checks: Sequence[SampleCheck]) -> str:
    return (f"{sum(c.colours_ok for c in checks)} of {len(checks)} prompts show their colours, "
            f"{sum(c.shape_ok for c in checks)} of {len(checks)} their shape")
