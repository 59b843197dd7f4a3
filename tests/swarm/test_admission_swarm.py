"""Admission with real nodes: an invited joiner trains with the mother, an uninvited peer is refused by the DHT, by a
group and by a state download, and a banned peer is dropped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.swarm.peers import Peer

pytestmark = pytest.mark.swarm


def sdswarm(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "sdswarm", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_invited_peers_train_uninvited_are_refused_and_banned_are_dropped(tmp_path):
    mother = Peer("mother", tmp_path, max_steps=100_000, **{"swarm.min_peers": 2})
    joiner = None
    try:
        mother.start()
        mother.wait_until(lambda: "others join this swarm with" in mother.log(), "the relay came up", timeout=300)
        # the mother's folder mints the join command; the joiner runs it as printed
        command = sdswarm("invite", "--output", str(mother.out), "--hours", "1").splitlines()[-1]
        assert command.startswith(f"python server.py -j {mother.address} --invite ")
        joiner = Peer("joiner", tmp_path, join=mother.address, max_steps=100_000,
                      env={"SDSWARM_INVITE": command.split("--invite ")[1]}).start()
        joiner.wait_until(lambda: "Averaged gradients with 2 peers" in joiner.log(), "averaging with the mother")

        rogue = subprocess.run([sys.executable, "-m", "tests.swarm.rogue", mother.address, "tiny",
                                str(tmp_path / "rogue")], cwd=ROOT, capture_output=True, text=True, timeout=180,
                               env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"})
        assert rogue.returncode == 0, rogue.stderr[-3000:]
        found = json.loads(rogue.stdout.splitlines()[-1])
        assert "bootstrap failed" in found["dht_error"]  # no DHT peer answers it
        assert found["join_group"] == ["PROTOCOL_VIOLATION"] and found["state_parts"] == 0, found
        rogue_id = found["peer_id"]
        mother.wait_until(lambda: f"refused a DHT request from peer {rogue_id}" in mother.log(), "the DHT refusal")
        for what in ("join an averaging group", "download the training state"):
            assert f"refused peer {rogue_id}: it asked to {what}" in mother.log(), what

        joiner_id = next(line.split("peer id ")[1].split(")")[0] for line in joiner.log().splitlines()
                         if "DHT started (peer id" in line)
        assert joiner_id in sdswarm("ban", joiner_id, "--output", str(mother.out))
        mother.wait_until(lambda: f"banned from the swarm: {joiner_id}" in mother.log(), "the ban taking effect")
        mother.wait_until(lambda: f"from peer {joiner_id}: a banned peer" in mother.log()
                          or f"refused peer {joiner_id}" in mother.log(), "the banned peer refused", timeout=180)
        step = mother.step()
        mother.wait_until(lambda: mother.step() >= step + 8, "the mother training on", timeout=240)
    finally:
        for peer in (mother, joiner):
            if peer is not None:
                peer.kill()
