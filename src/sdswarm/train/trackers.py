"""Metrics for the tools trainers already watch: TensorBoard and Weights & Biases (`--log-with`), beside
metrics.jsonl and the dashboard, with the same figures. Each is an optional extra (`pip install sdswarm[tensorboard]`,
`sdswarm[wandb]`); nothing is installed or imported unless asked for.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from PIL import Image

log = logging.getLogger(__name__)

TrackerName = Literal["tensorboard", "wandb"]
TRACKERS: tuple[TrackerName, ...] = ("tensorboard", "wandb")
# the figures a metrics.jsonl record has, as the dashboard shows them; grouped under "train/" in both tools
FIGURES = ("loss", "loss_avg", "samples_per_second", "samples_seen", "skipped_steps", "local_epoch", "swarm_epoch",
           "swarm_samples")


class Tracker(Protocol):
    def log(self, record: Mapping[str, Any], step: int) -> None: ...
    def log_image(self, name: str, image: Image.Image, step: int) -> None: ...
    def close(self) -> None: ...


def figures(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record, named as the trackers show them."""
    out = {}
    for key in FIGURES:
        value = record.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            out[f"train/{key}"] = float(value)
    return out


class TensorBoardTracker:
    """Event files in OUTPUT/tensorboard: `tensorboard --logdir OUTPUT/tensorboard`."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("--log-with tensorboard needs the tensorboard package: pip install "
                               "'sdswarm[tensorboard]' (or pip install tensorboard)") from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: Mapping[str, Any], step: int) -> None:
        for name, value in figures(record).items():
            self.writer.add_scalar(name, value, global_step=step)

    def log_image(self, name: str, image: Image.Image, step: int) -> None:
        import numpy as np

        self.writer.add_image(name, np.asarray(image.convert("RGB")), global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run named after the swarm's run_id; offline when WANDB_MODE=offline (then `wandb sync` later)."""

    def __init__(self, run_dir: Path, project: str, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise RuntimeError("--log-with wandb needs the wandb package: pip install 'sdswarm[wandb]' "
                               "(or pip install wandb), then `wandb login` or WANDB_MODE=offline") from exc
        run_dir.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=project, dir=str(run_dir), config=dict(config))

    def log(self, record: Mapping[str, Any], step: int) -> None:
        self.run.log(figures(record), step=step)

    def log_image(self, name: str, image: Image.Image, step: int) -> None:
        self.run.log({name: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: Sequence[TrackerName], output_dir: Path, run_id: str,
                  config: Mapping[str, Any]) -> list[Tracker]:
    """The trackers asked for, writing under `output_dir`; a missing package is a clear error at start-up."""
    trackers: list[Tracker] = []
    for name in dict.fromkeys(names):  # each once, in the order given
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(Path(output_dir) / "tensorboard"))
        elif name == "wandb":
            trackers.append(WandbTracker(Path(output_dir), project=run_id, config=config))
        else:
            raise ValueError(f"unknown tracker {name!r} (known: {', '.join(TRACKERS)})")
        log.info("metrics also go to %s", name)
    return trackers
