"""A mother node trains the tiny model on the demo data: loss falls, checkpoints resume, stops are clean."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from sdswarm.config import load_config
from sdswarm.node import run_mother
from sdswarm.swarm.settings import save_settings
from sdswarm.train.checkpoint import load_training_state
from sdswarm.train.loop import Trainer
from tests.conftest import LOOPBACK, ROOT, tiny_overrides
from tests.howto_bucket import howto_bucket


def render(checkpoint) -> Image.Image:
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe("original, 1shape, red circle", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0)).images[0]


def test_short_run_lowers_the_loss_and_leaves_checkpoints_and_samples(tmp_path):
    config = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides(
        tmp_path, **{"train.max_steps": 40, "output.checkpoint_every": 10, "output.keep_checkpoints": 2,
                     "output.sample_every": 20}))
    summary = run_mother(config, settings=LOOPBACK)

    assert summary.progress.step == 40 and summary.progress.skipped_steps == 0
    # v-prediction (the tiny model): 40 steps take about 30% off; a trainer that does not learn takes ~0%
    assert summary.eval_loss_end < 0.8 * summary.eval_loss_start, summary
    # pruned to the newest two; each loads as a diffusers pipeline and renders
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step_00000030", "step_00000040"]
    image = render(tmp_path / "checkpoints" / "step_00000040")
    assert image.size == (64, 64) and np.asarray(image).std() > 0
    # a grid at the sample cadence and at the end: 4 prompts side by side, not a blank picture
    for name in ("step_00000020.png", "step_00000040.png"):
        grid = Image.open(tmp_path / "samples" / name)
        assert grid.size == (4 * 64, 64)
        assert np.asarray(grid).std() > 5
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 40 and metrics[-1]["local_epoch"] >= 1


def test_resume_continues_with_the_same_step_count_and_optimizer_state(tmp_path, monkeypatch):
    overrides = tiny_overrides(tmp_path)
    run_mother(load_config(ROOT / "configs" / "tiny.yaml", overrides), settings=LOOPBACK)
    saved = load_training_state(tmp_path / "checkpoints" / "step_00000012")
    assert saved["progress"]["step"] == 12

    captured = {}

    def capture(self, stop):
        captured["trainer"] = self
        return self.progress

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "run", capture)
        run_mother(load_config(ROOT / "configs" / "tiny.yaml", overrides), settings=LOOPBACK, resume=True)
    trainer = captured["trainer"]
    assert trainer.progress.step == 12
    assert (trainer.progress.data_round, trainer.progress.data_batch) == (
        saved["progress"]["data_round"], saved["progress"]["data_batch"])
    restored = trainer.optimizer.state_dict()
    assert restored["state"]["local_epoch"] == saved["optimizer"]["state"]["local_epoch"] > 0
    for index, expected in saved["optimizer"]["state"].items():
        if index == "local_epoch":
            continue
        for key, value in expected.items():
            torch.testing.assert_close(restored["state"][index][key], value, rtol=0, atol=0)
    torch.testing.assert_close(trainer.noise_generator.get_state(), saved["rng"]["noise"])

    summary = run_mother(load_config(ROOT / "configs" / "tiny.yaml", {**overrides, "train.max_steps": 18}),
                         settings=LOOPBACK, resume=True)
    assert summary.progress.step == 18
    assert load_training_state(tmp_path / "checkpoints" / "step_00000018")["progress"]["step"] == 18


def test_an_error_during_training_leaves_a_checkpoint(tmp_path, monkeypatch):
    original = Trainer.train_step

    def failing(self, batch):
        if self.progress.step == 3:
            raise RuntimeError("simulated failure")
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_mother(load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides(tmp_path)), settings=LOOPBACK)
    assert load_training_state(tmp_path / "checkpoints" / "step_00000003")["progress"]["step"] == 3


def test_sigterm_leaves_a_complete_checkpoint_and_no_process(tmp_path):
    """The how-to's own command, stopped by SIGTERM mid-run."""
    out = tmp_path / "out"
    save_settings(LOOPBACK, out)
    sets = [f"--set={k}={v}" for k, v in tiny_overrides(out, **{"train.max_steps": 100000,
                                                                   "output.checkpoint_every": 1000}).items()]
    process = subprocess.Popen(
        [sys.executable, "server.py", "-m", "configs/tiny.yaml", *sets], cwd=ROOT, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.exists() and metrics.read_text().count('"step"') >= 2):  # the trainer's lines
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the node did not start training in time"
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output
        assert "SIGTERM received" in output
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], "partial checkpoint left"
        (checkpoint,) = (out / "checkpoints").iterdir()
        step = load_training_state(checkpoint)["progress"]["step"]
        assert checkpoint.name == f"step_{step:08d}" and step >= 4
        render(checkpoint)
        # DHT, averagers and p2pd ended with the node (torch's shm manager follows within a moment)
        deadline = time.monotonic() + 15
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(process.pid), "processes of the node outlived it"
    finally:
        if process.poll() is None or _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_resume_fetches_nothing_already_cached_and_continues_in_the_same_round(tmp_path, caplog):
    """The how-to's set-up (an HTTP bucket and its SQLite index): a resumed run takes its eval batches and the
    round it stopped in from the work dir, and fetches none of the posts it already holds."""
    with howto_bucket(tmp_path / "bucket", 48) as (bucket, template, index):
        overrides = tiny_overrides(tmp_path / "out", **{"data.source": template, "data.index": str(index),
                                                         "train.max_steps": 6, "output.checkpoint_every": 1000})
        with caplog.at_level(logging.INFO):
            run_mother(load_config(ROOT / "configs" / "tiny.yaml", overrides), settings=LOOPBACK)
        assert "is the how-to's index (posts: post_id, ext, rating): converting it once" in caplog.text
        saved = load_training_state(tmp_path / "out" / "checkpoints" / "step_00000006")["progress"]
        assert saved["data_slot"] is not None
        cached = {p.name for p in (tmp_path / "out" / "workdir").iterdir() if p.suffix == ".png"}
        assert cached and (tmp_path / "out" / "eval_batches.pt").is_file()
        hits_before = bucket.hits.copy()

        caplog.clear()
        with caplog.at_level(logging.DEBUG):  # a round served from the cache is logged at DEBUG
            summary = run_mother(load_config(ROOT / "configs" / "tiny.yaml", {**overrides, "train.max_steps": 10}),
                                 settings=LOOPBACK, resume=True)
        assert summary.progress.step == 10
        fetched_again = {name.rsplit("/", 1)[1] for name, n in bucket.hits.items() if n > hits_before[name]}
        assert not fetched_again & cached, f"fetched again after the resume: {sorted(fetched_again & cached)}"
        resumed = re.search(rf"round {saved['data_round']} \(slot (\d+)\): \d+ of \d+ posts ready \((\d+) fetched",
                            caplog.text)
        assert resumed and int(resumed.group(1)) == saved["data_slot"] and resumed.group(2) == "0", caplog.text
        assert "converting it once" not in caplog.text  # the converted index is reused
        # no round before the one it stopped in is drawn again (for the eval batches or the bucket table)
        drawn = {int(r) for r in re.findall(r"round (\d+) \(slot", caplog.text)}
        assert saved["data_round"] > 0 and min(drawn) == saved["data_round"], (saved, drawn)
