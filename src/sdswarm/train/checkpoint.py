"""Checkpoints: a diffusers pipeline folder plus the training state, written atomically, pruned, resumed.

Layout of one checkpoint (`OUTPUT/checkpoints/step_00001000/`):
    model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   StableDiffusionPipeline.from_pretrained
    training_state.pt   optimizer, scaler, EMA, counters, RNG (torch.save, loads with weights_only=True)
    config.yaml         the config the run was trained with
A checkpoint is built in a hidden temp folder and renamed into place (sdswarm.atomic), so a crash leaves
either the whole checkpoint or none; temp folders left by a killed process are removed on the next start.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from sdswarm.atomic import TEMP_NAME, atomic_path
from sdswarm.model.loading import SDComponents

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
CHECKPOINT_NAME = re.compile(r"^step_(\d{8,})$")


def as_pipeline(components: SDComponents, scheduler=None) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler or components.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class Checkpoints:
    """The checkpoints of one run, in `root`, newest `keep` kept; each holds `config_yaml`, the run's config."""

    def __init__(self, root: Path, keep: int, config_yaml: str = "") -> None:
        self.root, self.keep, self.config_yaml = Path(root), keep, config_yaml
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in (p for p in self.root.iterdir() if TEMP_NAME.match(p.name)):
            log.warning("removing incomplete checkpoint %s (left by an interrupted save)", leftover)
            shutil.rmtree(leftover, ignore_errors=True)

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = [p for p in self.root.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, components: SDComponents, training_state: dict[str, Any]) -> Path:
        final = self.root / f"step_{step:08d}"
        # durable: a power cut must not publish empty files; the same step saved twice (periodic, then on
        # stop): the newer one wins
        with atomic_path(final, durable=True) as tmp:
            as_pipeline(components).save_pretrained(tmp, safe_serialization=True)
            (tmp / CONFIG_FILE).write_text(self.config_yaml, encoding="utf-8")
            torch.save(training_state, tmp / STATE_FILE)
        self.prune()
        log.info("saved checkpoint %s", final)
        return final

    def prune(self) -> None:
        for old in self.all()[: -self.keep]:
            log.info("pruning old checkpoint %s (keep_checkpoints=%d)", old, self.keep)
            shutil.rmtree(old, ignore_errors=True)


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint: {STATE_FILE} is missing")
    return torch.load(path, map_location="cpu", weights_only=True)

