"""`make demo` convinces: its last sample grid shows the prompts' colours and at least half of their shapes, where the
untrained model's shows neither.

This is the demo itself (configs/tiny.yaml, same code path as every run), so it trains for minutes; one test.
"""

from __future__ import annotations

import os

import pytest
from PIL import Image

from sdswarm.config import load_config
from sdswarm.model.loading import TINY_MODEL_ID, load_components
from sdswarm.model.text import PromptEncoder
from sdswarm.node import run_mother
from sdswarm.train.grid_check import check_grid, most, tally
from sdswarm.train.samples import render_grid
from tests.conftest import LOOPBACK, ROOT


def grid_checks(grid: Image.Image, config) -> list:
    return check_grid(grid, config.output.sample_prompts, config.resolution, config.resolution)


@pytest.mark.demo
@pytest.mark.timeout(2400)  # 1050 steps of 32: about 7 minutes on 2 cores, ~20 on a busy machine
@pytest.mark.skipif(not os.environ.get("SDSWARM_DEMO_CHECK"), reason="trains the whole demo (about 7 minutes on 2 "
                    "cores): set SDSWARM_DEMO_CHECK=1 to run it")
def test_the_demo_grid_shows_the_prompts_colours_and_shapes_and_the_untrained_one_does_not(tmp_path, capsys):
    config = load_config(ROOT / "configs" / "tiny.yaml", {"output.dir": str(tmp_path),
                                                           "output.checkpoint_every": 100000})
    out = config.output
    untrained = load_components(TINY_MODEL_ID)
    encoder = PromptEncoder(untrained.tokenizer, untrained.text_encoder, config.extended_chunks,
                            config.clip_penultimate)
    before = grid_checks(render_grid(untrained, encoder, out.sample_prompts, width=config.resolution,
                                     height=config.resolution, steps=out.sample_steps, guidance=out.sample_guidance,
                                     seed=config.seed), config)
    assert len(before) == len(out.sample_prompts) >= 3, "the demo's prompts are one shape on one background"
    assert not most([c.colours_ok for c in before]) and not most([c.shape_ok for c in before]), \
        [c.describe() for c in before]

    summary = run_mother(config, settings=LOOPBACK)
    final = tmp_path / "samples" / f"step_{summary.progress.step:08d}.png"
    after = grid_checks(Image.open(final), config)
    with capsys.disabled():
        print(f"\ndemo grid {final}: {tally(after)}\n  " + "\n  ".join(c.describe() for c in after))
    assert most([c.colours_ok for c in after]), [c.describe() for c in after]
    # half, not most: the check reads the blurred five-pointed star as a square or a triangle (sessions 24-25: 3 of 4)
    shapes = [c.colours_ok and c.shape_ok for c in after]
    assert 2 * sum(shapes) >= len(shapes), [c.describe() for c in after]
