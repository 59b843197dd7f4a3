"""A LoRA swarm of real peers on 127.0.0.1: one set of adapters, a late joiner that downloads kilobytes, and peers
with another base model turned away (through the relay or through the DHT)."""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sdswarm.config import LoraConfig
from sdswarm.model.loading import TINY_MODEL_ID, load_components
from sdswarm.model.lora import ADAPTER_FILE, adapter_state, add_adapters
from sdswarm.model.tiny import TINY_MODEL_DIRNAME, build_tiny_model
from sdswarm.swarm.invites import SWARM_KEY_FILE
from tests.swarm.peers import Peer
from tests.swarm.test_swarm import l2, peers  # noqa: F401  (the fixture)

pytestmark = pytest.mark.swarm

RANK = 4
LORA = {"train.lora": f"{{rank: {RANK}}}"}
SWARM_STEPS = 16


def adapters(peer: Peer) -> dict[str, torch.Tensor]:
    (checkpoint,) = sorted((peer.out / "checkpoints").iterdir())[-1:]
    return load_file(checkpoint / ADAPTER_FILE)


def test_a_lora_swarm_holds_one_set_of_adapters_a_late_joiner_downloads_only_them_and_another_base_is_refused(
        peers, tmp_path):  # noqa: F811
    mother = peers("mother", max_steps=1000, **LORA, **{"lr": 1e-2, "swarm.min_peers": 2,
                                                         "train.max_swarm_steps": SWARM_STEPS,
                                                         "swarm.target_batch_size": 64}).start()
    mother.wait_until(lambda: "others join this swarm with" in mother.log(), "the relay came up", timeout=300)
    first = peers("first", join=mother.address, max_steps=1000).start()

    # a peer whose builtin:tiny is another model (built from another seed) is turned away, naming both bases: one
    # that joins through the relay (its answer names the base), one that reaches the swarm's DHT with --peers (the
    # peers publish their base with their telemetry; it holds a copy of the swarm key, so the DHT admits it)
    other_cache = tmp_path / "other-cache"
    build_tiny_model(other_cache / TINY_MODEL_DIRNAME, seed=1, vae_steps=5, text_steps=5)
    impostor = peers("impostor", join=mother.address, max_steps=1000, env={"SDSWARM_CACHE": str(other_cache)}).start()
    stranger = peers("stranger", max_steps=1000, **LORA, env={"SDSWARM_CACHE": str(other_cache)})
    stranger.args += ["--peers", mother.address]
    stranger.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(mother.out / SWARM_KEY_FILE, stranger.out / SWARM_KEY_FILE)
    stranger.start()
    for refused_peer, whose in ((impostor, r"the swarm's"), (stranger, r"the swarm's peer \w+'s")):
        assert refused_peer.wait_exit(timeout=300) != 0
        refused = re.search(r"this peer's base model builtin:tiny \(weights sha256 (\w{16})\) differs from "
                            + whose + r" builtin:tiny \(weights sha256 (\w{16})\)", refused_peer.log())
        assert refused and refused[1] != refused[2], refused_peer.log()[-3000:]

    mother.wait_until(lambda: mother.epoch() >= 1, "swarm step 1", timeout=400)
    late = peers("late", join=first.address, max_steps=1000).start()  # any relay is an entry point
    late.wait_until(lambda: "caught up: now at swarm step" in late.log(), "downloading the state", timeout=300)
    late.wait_until(lambda: "Averaged gradients with 3 peers" in late.log(), "a round with all three", timeout=400)
    everyone = [mother, first, late]
    for peer in everyone:
        assert peer.wait_exit(timeout=600) == 0, peer.log()[-4000:]

    # hivemind was handed the adapters only: the late joiner's download is their fp32 values and AdamW's two moments
    trained = int(re.search(r"training: LoRA rank 4 .*?averages the adapters only, ([\d,]+) parameters",
                            mother.log())[1].replace(",", ""))
    full = sum(p.numel() for m in (load_components(TINY_MODEL_ID).unet, load_components(TINY_MODEL_ID).text_encoder)
               for p in m.parameters())
    downloaded = float(re.search(r"downloaded the swarm's state: ([\d.]+) MB", late.log())[1]) * 1e6
    # the adapters (fp16, or fp32 where a tensor is too small to compress) and AdamW's two moments (8-bit or fp32)
    assert 4 * trained <= downloaded <= 12 * trained + 4096, (trained, downloaded)  # + AdamW's step counters
    assert downloaded < 0.1 * 12 * full
    for peer in everyone:
        assert f"the swarm reached swarm step {SWARM_STEPS} (train.max_swarm_steps)" in peer.log(), (
            f"{peer.name} stopped elsewhere")
        assert all(math.isfinite(m["loss"]) for m in peer.metrics())

    # one set of adapters: the peers differ far less than training moved them (the full fine-tune's bound)
    initial = load_components(TINY_MODEL_ID)
    add_adapters(initial, LoraConfig(rank=RANK), text_encoder=True, seed=42)
    initial_state = adapter_state(initial)
    weights = [adapters(peer) for peer in everyone]
    assert all(w.keys() == initial_state.keys() for w in weights)
    moved = l2(weights[0][k] - initial_state[k] for k in initial_state)
    apart = max(l2(w[k] - weights[0][k] for k in initial_state) for w in weights[1:])
    assert moved > 1e-2 and apart < 0.2 * moved, (moved, apart)
