"""The demo's sample check sees what a person sees: the shape, its colour and the background of each sample."""

from __future__ import annotations

import pytest
from PIL import Image, ImageFilter

from sdswarm.data.demo import SHAPES, PostSpec, ShapeSpec, render
from sdswarm.train.grid_check import NO_SHAPE, Look, check_grid, check_sample, most, tally, wanted_look


def picture(kind: str, colour: str = "red", background: str = "blue", size: int = 64, dx: int = 0) -> Image.Image:
    shape = ShapeSpec(kind, colour, size // 2 + dx, size // 2, round(0.37 * size))
    return render(PostSpec(1, size, size, (background,), "vertical", (shape,)))


def prompt(kind: str, colour: str = "red", background: str = "blue") -> str:
    return f"original, 1shape, {background} background, {kind}, {colour} {kind}"


def test_a_prompt_asks_for_one_shape_in_a_colour_on_a_background_and_other_prompts_are_not_checked():
    assert wanted_look(prompt("star", "yellow", "black")) == Look("star", "yellow", "black")
    assert wanted_look("original, 2shapes, red circle, blue square, white background") is None
    assert wanted_look("a photo of a cat") is None
    assert check_sample(picture("circle"), "a photo of a cat") is None


@pytest.mark.parametrize("kind", SHAPES)
def test_each_demo_shape_is_seen_as_itself_sharp_blurred_and_off_centre(kind):
    for image in (picture(kind), picture(kind).filter(ImageFilter.GaussianBlur(1.5)), picture(kind, dx=6)):
        check = check_sample(image, prompt(kind))
        assert check.seen == Look(kind, "red", "blue") and check.colours_ok and check.shape_ok, check.describe()
    assert check_sample(picture(kind, size=128), prompt(kind)).shape_ok


def test_a_blob_is_not_a_star_and_wrong_colours_are_missed():
    blob = picture("star").filter(ImageFilter.GaussianBlur(6))  # the points melt into a round blob
    check = check_sample(blob, prompt("star"))
    assert check.seen.shape != "star" and check.colours_ok and not check.shape_ok, check.describe()
    swapped = check_sample(picture("circle", "blue", "red"), prompt("circle"))
    assert swapped.seen == Look("circle", "blue", "red") and swapped.shape_ok and not swapped.colours_ok
    flat = check_sample(Image.new("RGB", (64, 64), (40, 80, 220)), prompt("circle"))
    assert flat.seen.shape == NO_SHAPE and not flat.shape_ok


def test_a_grid_is_read_left_to_right_and_most_prompts_must_show():
    kinds = ["circle", "star", "square", "triangle"]
    grid = Image.new("RGB", (128, 128))
    for index, kind in enumerate(kinds):
        shown = "circle" if kind == "star" else kind  # one sample wrong
        grid.paste(picture(shown), ((index % 2) * 64, (index // 2) * 64))
    checks = check_grid(grid, [prompt(k) for k in kinds] + ["a photo of a cat"], 64, 64)
    assert [c.shape_ok for c in checks] == [True, False, True, True] and all(c.colours_ok for c in checks)
    assert most([c.shape_ok for c in checks]) and not most([c.shape_ok for c in checks[:2]]) and not most([])
    assert tally(checks) == "4 of 4 prompts show their colours, 3 of 4 their shape"
