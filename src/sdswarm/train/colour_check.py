"""Does a sample grid show its prompts? For demo prompts ("... blue background, circle, red circle"), the mean
colour of each sample's centre should be nearest the shape's colour and that of its border nearest the
background's: what a person sees at a glance, measured without one."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdswarm.data.demo import COLOURS, SHAPES

_SHAPE = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
_BACKGROUND = re.compile(rf"\b({'|'.join(COLOURS)}) background\b")


@dataclass(frozen=True)
class SampleCheck:
    prompt: str
    shape: str  # expected colours
    background: str
    centre: str  # the palette colours nearest to what the sample shows
    border: str

    @property
    def ok(self) -> bool:
        return self.centre == self.shape and self.border == self.background

    def describe(self) -> str:
        verdict = "ok" if self.ok else "MISSED"
        return (f"{verdict:6} {self.prompt!r}: centre {self.centre} (want {self.shape}), "
                f"border {self.border} (want {self.background})")


def expected_colours(prompt: str) -> tuple[str, str] | None:
    """(shape colour, background colour) of a one-shape, one-background demo prompt; None for any other prompt."""
    shapes, backgrounds = _SHAPE.findall(prompt), _BACKGROUND.findall(prompt)
    if len(shapes) != 1 or len(backgrounds) != 1:
        return None
    return shapes[0][0], backgrounds[0]


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def check_sample(image: Image.Image, prompt: str) -> SampleCheck | None:
    """Centre: the middle square of a quarter of the side each way from the middle (inside every demo shape);
    border: the outer eighth on each side (background: the shapes keep clear of it for the most part)."""
    expected = expected_colours(prompt)
    if expected is None:
        return None
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = pixels.shape[:2]
    centre = pixels[3 * height // 8 : 5 * height // 8, 3 * width // 8 : 5 * width // 8].reshape(-1, 3)
    band_h, band_w = max(height // 8, 1), max(width // 8, 1)
    frame = np.ones((height, width), dtype=bool)
    frame[band_h:-band_h, band_w:-band_w] = False
    return SampleCheck(prompt, *expected, centre=nearest_colour(centre.mean(axis=0)),
                       border=nearest_colour(pixels[frame].mean(axis=0)))


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


def shows_its_prompts(checks: Sequence[SampleCheck]) -> bool:
    """Most checked prompts (more than half) pass."""
    return bool(checks) and 2 * sum(c.ok for c in checks) > len(checks)
