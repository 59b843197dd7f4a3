"""--log-with: TensorBoard and W&B get the figures metrics.jsonl has, and the sample grids."""

from __future__ import annotations

import json
import sys
import types

import pytest

from sdswarm.cli import build_parser
from sdswarm.config import load_config
from sdswarm.node import run_mother
from sdswarm.train.trackers import open_trackers
from tests.conftest import LOOPBACK, ROOT, tiny_overrides


class FakeWandb(types.ModuleType):
    """What a W&B run receives (the real one needs an account or writes offline runs of a few MB)."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.logged: list[tuple[int, dict]] = []
        self.init_kwargs: dict = {}
        self.finished = False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished = True

    class Image:
        def __init__(self, image) -> None:
            self.size = image.size


def test_both_trackers_get_the_dashboard_figures_and_the_grids(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="pip install 'sdswarm[tensorboard]' to test --log-with tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    args = build_parser().parse_args(["mother", "configs/tiny.yaml", "--log-with", "tensorboard",
                                      "--log-with", "wandb"])
    assert args.log_with == ["tensorboard", "wandb"]
    config = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides(
        tmp_path, **{"train.max_steps": 6, "output.log_with": args.log_with, "output.sample_every": 3}))
    run_mother(config, settings=LOOPBACK)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    metrics = [r for r in records if "step" in r]  # the training figures (rounds and swarm steps have their own)
    assert [m["step"] for m in metrics] == [2, 4, 6]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss_avg")]
    assert loss == [(m["step"], pytest.approx(m["loss_avg"], rel=1e-6)) for m in metrics]
    assert {"train/samples_per_second", "train/swarm_samples", "train/local_epoch"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("samples")] == [3, 6]

    scalars = [(step, values) for step, values in wandb.logged if "train/loss" in values]
    assert [(step, values["train/loss"]) for step, values in scalars] == [
        (m["step"], pytest.approx(m["loss"])) for m in metrics]
    assert [step for step, values in wandb.logged if "samples" in values] == [3, 6]
    assert wandb.init_kwargs["project"] == "tiny" and wandb.finished


def test_a_missing_package_is_named_with_the_command_that_installs_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'sdswarm\[wandb\]'"):
        open_trackers(["wandb"], tmp_path, "run", {})
