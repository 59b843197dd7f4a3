"""Shared fixtures: a per-session cache (tiny model, demo data) and tiny run configs; nothing touches ~/.cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sdswarm.config import Config, load_config
from sdswarm.swarm.settings import NodeSettings

# test nodes listen on loopback only, on ports the system picks
LOOPBACK = NodeSettings(mode="relay", listen_host="127.0.0.1", ie_port_internal=0, dht_port_internal=0)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def sdswarm_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sdswarm-cache")
    previous = os.environ.get("SDSWARM_CACHE")
    os.environ["SDSWARM_CACHE"] = str(path)  # inherited by peers started as subprocesses
    # build the tiny model once, up front: peers started later must not each wait for (or race) the build
    from sdswarm.model.loading import TINY_MODEL_ID, load_components

    load_components(TINY_MODEL_ID)
    yield path
    if previous is None:
        os.environ.pop("SDSWARM_CACHE", None)
    else:
        os.environ["SDSWARM_CACHE"] = previous


def tiny_overrides(out: Path, **extra) -> dict:
    """configs/tiny.yaml, made short: a few steps, frequent checkpoints, quick samples."""
    return {
        "output.dir": str(out),
        "train.max_steps": 12,
        "train.batch_size": 4,
        "output.checkpoint_every": 6,
        "output.sample_every": 1000,
        "output.sample_steps": 2,
        "output.log_every": 2,
        "swarm.target_batch_size": 4,
        **extra,
    }


@pytest.fixture
def tiny_config(tmp_path) -> Config:
    return load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides(tmp_path / "out"))
