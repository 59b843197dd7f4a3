"""Several real peers on 127.0.0.1: they train one model together and survive peers coming and going."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from sdswarm.model.loading import TINY_MODEL_ID, load_components
from sdswarm.swarm.exchange import fetch_swarm_view
from sdswarm.swarm.invites import SWARM_KEY_FILE
from tests.conftest import ROOT
from tests.swarm.peers import Peer, Rogue

pytestmark = pytest.mark.swarm


@pytest.fixture
def peers(tmp_path):
    started: list[Peer] = []

    def make(name: str, **kwargs) -> Peer:
        peer = Peer(name, tmp_path, **kwargs)
        started.append(peer)
        return peer

    yield make
    for peer in started:  # always stop every process group, whatever the test did
        peer.kill()


def unet_weights(peer: Peer) -> dict[str, torch.Tensor]:
    (checkpoint,) = sorted((peer.out / "checkpoints").iterdir())[-1:]
    return load_file(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")


def test_three_peers_train_one_model(peers):
    # train.max_swarm_steps is the swarm's (joiners get it from the relay): all three stop after the same swarm step
    mother = peers("mother", max_steps=400, **{"swarm.min_peers": 3, "train.max_swarm_steps": 6}).start()
    mother.wait_until(lambda: "others join this swarm with" in mother.log(), "the relay came up", timeout=300)
    joiners = [peers(f"joiner{i}", join=mother.address, max_steps=400).start() for i in (1, 2)]
    everyone = [mother, *joiners]
    for peer in everyone:
        assert peer.wait_exit(timeout=400) == 0, peer.log()[-4000:]

    assert any("Averaged gradients with 3 peers" in peer.log() for peer in everyone), "no round with all three"
    # the rounds are data: each peer's metrics.jsonl holds them, with their group and bytes
    rounds = [r for peer in everyone for r in peer.rounds()]
    assert any(r["kind"] == "gradients" and r["outcome"] == "complete" and r["group_size"] == 3
               and r["bytes_sent"] > 0 for r in rounds), rounds
    for joiner in joiners:  # the demo is a real bucket: joiners fetch its files from the relay they joined
        assert f"files from Bucket('http://{mother.address}/api/v1/data/" in joiner.log()
    for peer in everyone:
        assert "the swarm reached swarm step 6 (train.max_swarm_steps)" in peer.log(), f"{peer.name} stopped elsewhere"
        assert peer.log().count("Averaged gradients with") >= 3, f"{peer.name} hardly ever averaged"
        assert all(math.isfinite(m["loss"]) for m in peer.metrics())
    assert_learned(everyone, by=0.1)  # 6 swarm steps of 32 samples: 0.73-0.80 of the start, measured
    # the swarm's last step ends with a round of everyone still there (partial rounds before it under load)
    assert any("the swarm ends as one model" in peer.log() for peer in everyone)
    # the peers hold one model: they differ far less than training moved them
    initial = load_components(TINY_MODEL_ID).unet.state_dict()
    weights = [unet_weights(peer) for peer in everyone]
    moved = l2(weights[0][k] - initial[k] for k in initial)
    apart = max(l2(w[k] - weights[0][k] for k in initial) for w in weights[1:])
    # independent runs differ by about as much as they moved (ratio ~1), peers with one unshared swarm step by ~0.1,
    # peers that shared every round by fp16 rounding only (~0.005)
    print(f"one model: the peers are {apart:.3g} apart, having moved {moved:.3g} ({apart / moved:.3f})")
    assert moved > 1e-2 and apart < 0.2 * moved, (moved, apart)
    # no two peers trained the same posts in the same round: distinct slots of the shard plan, round by round
    slots = [dict(re.findall(r"round (\d+) \(slot (\d+)\)", peer.log())) for peer in everyone]
    for r in set().union(*slots):
        held = [s[r] for s in slots if r in s]
        assert len(held) == len(set(held)), f"round {r}: slots {held}"
    # each peer drew its own data order and noise (seeded from the run seed and its identity)
    first_losses = {round(peer.metrics()[0]["loss"], 6) for peer in everyone}
    assert len(first_losses) == 3


def assert_learned(everyone: list[Peer], by: float) -> None:
    """Each peer's fixed-seed eval loss fell, and the swarm's (summed over the peers) by `by` of the start.
    Each peer's eval batches are 16 samples of its own shard: on them one shared model scores from 0.65 to 0.90 of
    its start, so the sum, not each peer, carries the bound."""
    losses = {peer.name: peer.eval_losses() for peer in everyone}
    assert all(end < start for start, end in losses.values()), losses
    assert sum(end for _, end in losses.values()) < (1 - by) * sum(start for start, _ in losses.values()), losses


def l2(tensors) -> float:
    return math.sqrt(sum(t.double().square().sum().item() for t in tensors))


def test_a_late_joiner_catches_up_and_a_killed_peer_does_not_stop_the_others(peers, tmp_path):
    mother = peers("mother", max_steps=1000, **{"swarm.min_peers": 2}).start()
    mother.wait_until(lambda: "others join this swarm with" in mother.log(), "the relay came up", timeout=300)
    # invited with the command `sdswarm invite` prints beside the mother
    command = sdswarm("invite", "--output", str(mother.out), "--hours", "1").splitlines()[-1]
    assert command.startswith(f"python server.py -j {mother.address} --invite ")
    first = peers("first", join=mother.address, max_steps=1000,
                  env={"SDSWARM_INVITE": command.split("--invite ")[1]}).start()

    # an uninvited peer: the DHT, a group and a state download refuse it, and the mother's log names it
    rogue = json.loads(sdswarm_module("tests.swarm.outsider", mother.address, "tiny", str(tmp_path / "rogue")))
    assert "bootstrap failed" in rogue["dht_error"] and rogue["state_parts"] == 0, rogue
    assert rogue["join_group"] == ["PROTOCOL_VIOLATION"], rogue
    for refusal in ("refused a DHT request from peer {}", "refused peer {}: it asked to join an averaging group",
                    "refused peer {}: it asked to download the training state"):
        mother.wait_until(lambda r=refusal: r.format(rogue["peer_id"]) in mother.log(), refusal, timeout=60)
    mother.wait_until(lambda: mother.epoch() >= 3, "swarm step 3")

    late = peers("late", join=first.address, max_steps=1000)  # any relay is an entry point
    # a co-admin: given a copy of the swarm key, it admits newcomers while the mother is away
    late.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(mother.out / SWARM_KEY_FILE, late.out / SWARM_KEY_FILE)
    late.start()
    late.wait_until(lambda: "caught up: now at swarm step" in late.log(), "downloading the state")
    late.wait_until(lambda: "Averaged gradients with 3 peers" in late.log(), "averaging with all three")
    # what it downloaded, measured, is what every node's start-up estimate says a late joiner downloads
    estimate = float(re.search(r"a late joiner downloads ([\d.]+) MB", late.log())[1])
    measured = float(re.search(r"downloaded the state from peer \S+: ([\d.]+) MB in [\d.]+ s \([\d.]+ Mbit/s\)",
                               late.log())[1])
    assert 0.8 * estimate <= measured <= 1.2 * estimate, (estimate, measured)

    first.signal(signal.SIGKILL)
    step = mother.step()
    mother.wait_until(lambda: mother.step() >= step + 12, "training on after a peer was killed", timeout=240)
    late.wait_until(lambda: "Averaged gradients with 2 peers" in late.log().split("caught up")[-1],
                    "averaging without the killed peer", timeout=240)
    for peer in (mother, late):
        assert all(math.isfinite(m["loss"]) for m in peer.metrics()), f"{peer.name} got a NaN loss"

    # the mother leaves; the swarm goes on and a new peer joins through a surviving relay
    mother.signal(signal.SIGTERM)
    assert mother.wait_exit(timeout=120) == 0
    assert not mother.group_alive(), "the mother left processes behind"
    newcomer = peers("newcomer", join=late.address, max_steps=1000).start()
    newcomer.wait_until(lambda: "Averaged gradients with 2 peers" in newcomer.log(), "averaging with the survivor",
                        timeout=240)
    assert f"files from Bucket('http://{late.address}/api/v1/data/" in newcomer.log()  # the data did not go either

    # the co-admin bans the newcomer: the list is signed by the swarm key, and the survivor drops it
    newcomer_id = re.search(r"DHT started \(peer id (\w+)\)", newcomer.log()).group(1)
    assert newcomer_id in sdswarm("ban", newcomer_id, "--output", str(late.out))
    late.wait_until(lambda: f"banned from the swarm: {newcomer_id}" in late.log(), "the ban taking effect")
    late.wait_until(lambda: re.search(f"refused .*peer {newcomer_id}", late.log()), "the banned peer refused",
                    timeout=180)
    newcomer.kill()
    late.signal(signal.SIGTERM)
    assert late.wait_exit(timeout=120) == 0


def sdswarm(*args: str) -> str:
    return sdswarm_module("sdswarm", *args)


def sdswarm_module(module: str, *args: str) -> str:
    """`python -m MODULE ARGS` from the checkout, as a user runs it; its output."""
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_stop_stops_every_process_within_seconds_and_the_terminal_stays_readable(peers):
    mother = peers("mother", max_steps=100_000, verbose=False).start()
    mother.wait_until(lambda: mother.step() >= 4, "training", timeout=300)
    # DHT, averagers, p2pd (torch's shm manager is torch's own: it leaves when its clients have)
    family = [p for p in psutil.Process(mother.process.pid).children(recursive=True) if p.name() != "torch_shm_manager"]
    assert any(p.name() == "p2pd" for p in family)

    started = time.monotonic()
    mother.signal(signal.SIGTERM)  # to the whole group, as a terminal's Ctrl-C or systemd does
    assert mother.wait_exit(timeout=120) == 0
    took = time.monotonic() - started
    _, left = psutil.wait_procs(family, timeout=2)
    assert not left, f"left behind: {[(p.pid, p.name()) for p in left]}"
    assert took < 20, f"a stop took {took:.1f} s"  # a few seconds idle: the step, a checkpoint, samples, eval
    terminal = mother.log()
    assert terminal.count("SIGTERM received") == 1, "a child process ran the node's signal handler"
    for noise in ("grace period", "killing it", "Task was destroyed", "Traceback"):
        assert noise not in terminal, noise
    # hivemind's chatter is in the output folder's log, not on the terminal
    chatter = "INFO hivemind.optim"  # e.g. its progress tracker's lines
    assert chatter not in terminal and chatter in (mother.out / "node.log").read_text()


def test_a_restarted_mother_rejoins_its_swarm(peers):
    mother = peers("mother", max_steps=100_000, **{"swarm.min_peers": 2}).start()
    mother.wait_until(lambda: "others join this swarm with" in mother.log(), "the relay came up", timeout=300)
    joiner = peers("joiner", join=mother.address, max_steps=100_000).start()
    mother.wait_until(lambda: mother.epoch() >= 3, "epoch 3", timeout=400)
    mother.wait_until(lambda: (mother.out / "peers").exists(), "the mother remembering its peers")

    mother.signal(signal.SIGTERM)
    assert mother.wait_exit(timeout=120) == 0
    epoch = joiner.epoch()
    joiner.wait_until(lambda: joiner.epoch() >= epoch + 2, "the joiner training on alone", timeout=300)

    mother.restart("--resume")  # no address given: it finds the swarm through the peers it last saw
    mother.wait_until(lambda: "rejoined the swarm through" in mother.log(), "rejoining", timeout=300)
    mother.wait_until(lambda: any(m in mother.log() for m in ("start-up barrier skipped", "downloading the current")),
                      "no wait at a barrier that has passed", timeout=300)
    mother.wait_until(lambda: "Averaged gradients with 2 peers" in mother.log(), "averaging with the joiner",
                      timeout=300)
    # one swarm again, one model: at a swarm step both reached after the restart, their weights' fingerprints
    # differ far less than one swarm step moves them
    def fingerprints(peer) -> dict[int, list[float]]:
        return {r["swarm_step"]: r["fingerprint"] for r in peer.records() if "fingerprint" in r}

    def one_model() -> bool:
        ours, theirs = fingerprints(mother), fingerprints(joiner)
        shared = sorted(set(ours) & set(theirs))
        if len(shared) < 2 or shared[-1] <= epoch + 2:  # a step made together after the restart
            return False
        last, before = shared[-1], shared[-2]
        return math.dist(ours[last], theirs[last]) < 0.5 * math.dist(ours[last], ours[before])
    mother.wait_until(one_model, "one model: the same fingerprint after the restart", timeout=300)
    # and one swarm to see: each relay's view (the dashboard's, `sdswarm status`'s) lists both peers, live
    for relay in (mother, joiner):
        relay.wait_until(lambda r=relay: live_peers(r) == {mother.peer_id(), joiner.peer_id()},
                         "both peers in the swarm view", timeout=60)
    for peer in (mother, joiner):
        peer.signal(signal.SIGTERM)
        assert peer.wait_exit(timeout=120) == 0


def live_peers(relay: Peer) -> set[str]:
    view = fetch_swarm_view(relay.address)
    return {p["peer_id"] for p in view["peers"] if not p["gone"]}


def test_a_rogue_peer_neither_hijacks_the_swarm_step_nor_poisons_the_rounds(peers, tmp_path):
    """Two rogues join through the mother's public answer: one reports swarm step 1000 with weights of 1234.0 (on
    hivemind as it is, the mother downloaded them within seconds and trained on NaN from then on), one sends NaN and
    1e6x gradient parts. The honest peers ignore the first, refuse the second's parts naming it and keep it out of
    their averaging groups, and train on as one model while it stays. The swarm is open (`swarm.access: open`): in
    an invite-only one they would be admitted members."""
    mother = peers("mother", max_steps=100_000, **{"swarm.min_peers": 2, "swarm.access": "open"}).start()
    mother.wait_until(lambda: "others join this swarm with" in mother.log(), "the relay came up", timeout=300)
    joiner = peers("joiner", join=mother.address, max_steps=100_000).start()
    honest = (mother, joiner)
    mother.wait_until(lambda: mother.epoch() >= 1, "swarm step 1", timeout=300)
    rogues = [Rogue(mother.address, attack, tmp_path).start() for attack in ("epoch", "poison")]
    try:
        hijacker, poisoner = (rogue.peer_id() for rogue in rogues)
        mother.wait_until(lambda: any(f"ignoring peer {hijacker}'s swarm step 1000" in p.log() for p in honest),
                          "the swarm step 1000 ignored", timeout=240)
        quarantined = f"peer {poisoner} is kept out of this peer's averaging groups"
        mother.wait_until(lambda: all(quarantined in p.log() for p in honest), "the poisoner quarantined", timeout=300)
        caught = max(p.epoch() for p in honest)
        joiner.wait_until(lambda: min(p.epoch() for p in honest) >= caught + 3, "3 more swarm steps", timeout=300)
        # while it stays: no round of theirs holds it, and they are one model (as test_three_peers_train_one_model)
        later = [r for p in honest for r in p.rounds() if r["kind"] == "gradients" and r["swarm_step"] > caught + 1]
        assert later and not any(poisoner in r["refused"] for r in later), later
        assert any(r["group_size"] == 2 for r in later), later  # the two of them averaged together
        ours, theirs = ({r["swarm_step"]: r["fingerprint"] for r in p.records() if "fingerprint" in r} for p in honest)
        last = max(set(ours) & set(theirs))
        apart, moved = math.dist(ours[last], theirs[last]), math.dist(ours[last], ours[min(ours)])
        print(f"fingerprints at swarm step {last}: {apart:.3g} apart, {moved:.3g} from the first")
        assert apart < 0.2 * moved, (apart, moved)
    finally:
        for rogue in rogues:
            rogue.kill()
    poisoned = "\n".join(line for p in honest for line in p.log().splitlines() if f"peer {poisoner} " in line)
    print(f"rogues: hijacker {hijacker}, poisoner {poisoner}; what the honest peers logged about the poisoner:\n"
          + "\n".join(poisoned.splitlines()[:6]))
    assert "refused" in poisoned, poisoned  # its NaN or 1e6x parts, whichever came first
    for peer in honest:
        peer.signal(signal.SIGTERM)
        assert peer.wait_exit(timeout=120) == 0
        assert all(math.isfinite(m["loss"]) for m in peer.metrics()), f"{peer.name} got a NaN loss"
        assert max(m["local_epoch"] for m in peer.metrics()) < 100, f"{peer.name} took the rogue's swarm step"
        start, end = peer.eval_losses()
        print(f"{peer.name}: eval loss {start:.4f} -> {end:.4f}, swarm step {peer.epoch()}")
        assert end < start, f"{peer.name}: eval loss {start} -> {end}"


DILOCO = {"swarm.sync": "local_steps", "swarm.local_steps": 4}


def test_diloco_three_peers_share_each_outer_step_and_hold_one_model(peers):
    mother = peers("mother", max_steps=400, **{"swarm.min_peers": 3, "train.max_swarm_steps": 4, **DILOCO}).start()
    mother.wait_until(lambda: "others join this swarm with" in mother.log(), "the relay came up", timeout=300)
    joiners = [peers(f"joiner{i}", join=mother.address, max_steps=400).start() for i in (1, 2)]
    everyone = [mother, *joiners]
    for peer in everyone:
        assert peer.wait_exit(timeout=400) == 0, peer.log()[-4000:]

    for peer in everyone:
        assert "swarm.sync local_steps, uniform8bit" in peer.log()  # the start-up network estimate
        assert "the swarm reached swarm step 4 (train.max_swarm_steps)" in peer.log(), f"{peer.name} stopped elsewhere"
        averaged = re.findall(r"swarm step \d+: averaged \(group of (\d)", peer.log())
        assert len(averaged) >= 3 and "3" in averaged, f"{peer.name}: {averaged}"
        # each outer step is an averaging round on record, as gradient rounds are
        assert any(r["kind"] == "outer" and r["outcome"] == "complete" and r["group_size"] == 3
                   and r["bytes_sent"] > 0 for r in peer.rounds()), peer.rounds()
    assert_learned(everyone, by=0.1)  # 4 outer steps of 4 local steps: 0.65-0.81 of the start, measured
    # checkpoints hold the global weights: the same on every peer, up to the 8-bit rounding of the averaged deltas
    initial = load_components(TINY_MODEL_ID).unet.state_dict()
    weights = [unet_weights(peer) for peer in everyone]
    moved = l2(weights[0][k] - initial[k] for k in initial)
    apart = max(l2(w[k] - weights[0][k] for k in initial) for w in weights[1:])
    assert moved > 1e-2 and apart < 0.05 * moved, (moved, apart)


def test_diloco_late_joiner_downloads_the_global_weights_and_a_killed_peer_does_not_block(peers):
    mother = peers("mother", max_steps=1000, **{"swarm.min_peers": 2, **DILOCO}).start()
    mother.wait_until(lambda: "others join this swarm with" in mother.log(), "the relay came up", timeout=300)
    first = peers("first", join=mother.address, max_steps=1000).start()
    mother.wait_until(lambda: mother.log().count(": averaged (group of 2") >= 2, "two outer steps")

    late = peers("late", join=mother.address, max_steps=1000).start()
    late.wait_until(lambda: "caught up: now at swarm step" in late.log(), "downloading the state")
    # global weights in fp16 + the outer momentum in 8 bits: 3 bytes per parameter, not 12
    found = re.search(r"a late joiner downloads ([\d.]+) MB \(([\d.]+) bytes per parameter\)", late.log())
    assert found and float(found.group(2)) < 3.5, late.log()[-3000:]
    assert f"global weights and outer momentum, {found.group(1)} MB" in late.log()
    late.wait_until(lambda: ": averaged (group of 3" in late.log(), "an outer step with all three")
    # `sdswarm status` shows DiLoCo's target (local_steps 4 x batch 4 x 3 peers), not swarm.target_batch_size (32)
    mother.wait_until(lambda: fetch_swarm_view(mother.address)["target_batch_size"] == 48, "DiLoCo's target shown",
                      timeout=60)

    step = mother.step()
    first.signal(signal.SIGKILL)  # in its local phase: outer steps are seconds apart, local steps most of the time
    late.wait_until(lambda: ": averaged (group of 2" in late.log().split("group of 3")[-1],
                    "an outer step without the killed peer", timeout=240)
    # the mother's steps go on (its next step's record comes after the round that the late joiner logged)
    mother.wait_until(lambda: mother.step() > step, "the mother training on", timeout=60)
    for peer in (mother, late):
        assert all(math.isfinite(m["loss"]) for m in peer.metrics()), f"{peer.name} got a NaN loss"
        peer.signal(signal.SIGTERM)
        assert peer.wait_exit(timeout=120) == 0
