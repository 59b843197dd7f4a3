"""Swarm health over a WAN (not a test): three tiny-model peers in network namespaces on capped links, one of them
killed and restarted mid-run, CPU load beside another; against the same swarm idle on uncapped links.

    sudo .venv/bin/python bench/wan.py                                   # idle, then wan: ~15 min
    sudo .venv/bin/python bench/wan.py --swarm-steps 20 --cap 10mbit --slow-cap 2mbit

Needs root. The namespaces are sdw1..sdw3 and sdwhub on 10.215.0.x (bench/diloco.py's Bridge), so this bench runs
beside that one. In the wan run every link is capped at --cap each way and peer 3's at --slow-cap, peer 3 shares
one core with a busy loop, and peer 2 is killed (SIGKILL) at a third of the swarm steps and restarted with --resume
15 s later. Both runs end at the same swarm step (train.max_swarm_steps) and the peers keep their identities from
one run to the next (the same data slots and eval batches). The solo run is peer 1 alone, trained on as many samples
as the idle swarm trained in all (equal samples: does a swarm learn as much per sample as one peer?). Printed for
each run: swarm steps done, averaging rounds by kind and outcome, the spread between the peers at each swarm step
(their weight fingerprints, in swarm steps' worth of movement; at the last step, after the swarm's final round),
samples trained per swarm step / target, and the final fixed-seed eval loss (mean over the peers) against the idle
run. Timings on a shared machine are noisy: compare within one invocation.

A swarm step overshoots its target by the samples the peers train between the target being reached and their
trackers stepping on it (their estimate of when it will be, refreshed from the DHT in the last second): at --target
32 (about half a second of the swarm's training) that is a large fraction, at the how-to's 75,000 none.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from diloco import Bridge
from swarm_traffic import sh

ROOT = Path(__file__).resolve().parent.parent
PREFIX, SUBNET = "sdw", "10.215.0"
IE_PORT, DHT_PORT = 8765, 31337
BATCH = 4


@dataclass
class Result:
    run: str
    swarm_steps: int
    wall: float
    rounds: Counter
    spread: dict[int, float]  # swarm step -> widest distance between two peers
    samples_per_step: float  # / the target
    eval_loss: float
    problems: list[str] = field(default_factory=list)
    samples: int = 0  # trained by all the peers together
    losses: list[float] = field(default_factory=list)  # each peer's (its own fixed eval batches), peer 1 first


class Peers:
    """The three peers of one run, each an `sdswarm` process in its namespace."""

    def __init__(self, bridge: Bridge, folder: Path, args: argparse.Namespace, env: dict[str, str]) -> None:
        self.bridge, self.folder, self.args, self.env = bridge, folder, args, env
        self.processes: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, list] = {}

    def out(self, i: int) -> Path:
        return self.folder / self.bridge.names[i - 1]

    def start(self, i: int, *extra: str, cpus: str | None = None, swarm_steps: int | None = None,
              min_peers: int = 3) -> None:
        relay = f"{self.bridge.address(1)}:{IE_PORT}"
        own = {"train.max_steps": 100_000, "train.batch_size": BATCH, "output.log_every": 1,
               "output.checkpoint_every": 10, "output.sample_every": 10**8, "output.sample_steps": 1}
        swarm = {"swarm.run_id": "wan", "swarm.access": "open", "swarm.min_peers": min_peers,
                 "swarm.target_batch_size": self.args.target, "swarm.matchmaking_time": 5,
                 "swarm.averaging_timeout": 30, "swarm.allreduce_timeout": 30,
                 "train.max_swarm_steps": swarm_steps or self.args.swarm_steps}
        sets = {**swarm, **own} if i == 1 else own
        cli = ["mother", "configs/tiny.yaml"] if i == 1 else ["join", relay]
        cli += [*(f"--set={k}={v}" for k, v in sets.items()), "--output", str(self.out(i)), *extra]
        pin = ["taskset", "-c", cpus] if cpus else []
        log = open(self.folder / f"{self.bridge.names[i - 1]}.log", "a")  # noqa: SIM115 (closed in stop())
        self.logs.setdefault(i, []).append(log)
        self.processes[i] = subprocess.Popen(
            ["ip", "netns", "exec", self.bridge.names[i - 1], *pin, sys.executable, "-m", "sdswarm", *cli],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, i: int) -> None:
        """SIGKILL peer `i` and whatever it left in its namespace (its p2pd, in a session of its own, would hold
        the DHT port of the restart)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.processes[i].pid, signal.SIGKILL)
        self.processes[i].wait()
        for pid in sh("ip", "netns", "pids", self.bridge.names[i - 1], check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.processes.values())

    def stop(self) -> None:
        for i in self.processes:
            self.kill(i)
        for logs in self.logs.values():
            for log in logs:
                log.close()

    def records(self, i: int) -> list[dict]:
        path = self.out(i) / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]

    def swarm_step(self, i: int) -> int:
        return max((r["local_epoch"] for r in self.records(i) if "local_epoch" in r), default=0)


def run(name: str, args: argparse.Namespace, folder: Path, identities: Path | None, solo_steps: int = 0) -> Result:
    """`solo_steps`: peer 1 alone, to that swarm step (one per target batch)."""
    wan = name == "wan"
    folder.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SDSWARM_CACHE": args.cache}
    caps = {3: args.slow_cap} if wan else {}
    problems, hog, began = [], None, time.time()
    cpu = str(os.cpu_count() - 1) if wan else None  # a busy loop and peer 3 share the last core
    with Bridge(3, args.cap if wan else "10gbit", prefix=PREFIX, subnet=SUBNET, caps=caps) as bridge:
        from sdswarm.swarm.settings import NodeSettings, save_settings

        peers = Peers(bridge, folder, args, env)
        for i in (1, 2, 3):
            save_settings(NodeSettings(mode="relay", listen_host=bridge.address(i), ie_port_internal=IE_PORT,
                                       dht_port_internal=DHT_PORT), peers.out(i))
            if identities is not None:  # the same peers as in the idle run: same data slots, same eval batches
                shutil.copy(identities / bridge.names[i - 1] / "identity.key", peers.out(i) / "identity.key")
        try:
            if cpu is not None:
                hog = subprocess.Popen(["taskset", "-c", cpu, sys.executable, "-c", "while True: pass"])
            if solo_steps:
                peers.start(1, swarm_steps=solo_steps, min_peers=1)
            else:
                peers.start(1)
                time.sleep(20)  # the relay first
                peers.start(2)
                peers.start(3, cpus=cpu)
            deadline, killed = time.monotonic() + args.timeout, False
            while peers.running() and time.monotonic() < deadline:
                if wan and not killed and peers.swarm_step(2) >= args.swarm_steps // 3:
                    print(f"  killing peer 2 at swarm step {peers.swarm_step(2)}; restarting it in 15 s", flush=True)
                    peers.kill(2)
                    killed = True
                    time.sleep(15)
                    peers.start(2, "--resume")
                time.sleep(1)
            if peers.running():
                problems.append(f"stopped after {args.timeout:.0f} s")
        finally:
            peers.stop()
            if hog is not None:
                hog.kill()
    return measure(name, peers, time.time() - began, problems, args.target, 1 if solo_steps else 3)


def measure(name: str, peers: Peers, wall: float, problems: list[str], target: int, count: int) -> Result:
    from sdswarm.swarm.health import FingerprintEntry, spread

    indices = range(1, count + 1)
    records = {i: peers.records(i) for i in indices}
    rounds = Counter(f"{r['round']['kind']} {r['round']['outcome']}" for rs in records.values() for r in rs
                     if "round" in r)
    steps = max(peers.swarm_step(i) for i in indices)
    samples = sum(BATCH for rs in records.values() for r in rs if "step" in r)  # one record per batch (log_every 1)
    # each peer's fingerprint per swarm step (a restarted peer's latest), with its movement since the step before
    by_step: dict[int, dict[int, FingerprintEntry]] = {}
    for i, rs in records.items():
        prints = {r["swarm_step"]: r["fingerprint"] for r in rs if "fingerprint" in r}
        for step, values in prints.items():
            before = prints.get(step - 1)
            by_step.setdefault(step, {})[i] = FingerprintEntry(
                swarm_step=step, values=values, movement=None if before is None else math.dist(values, before))
    widths = {}
    for step, entries in sorted(by_step.items()):
        found = spread({str(i): [e] for i, e in entries.items()}) if len(entries) >= 2 else None
        if found is not None:
            widths[step] = found[1]
    losses = []
    for ns in peers.bridge.names[:count]:
        found = re.findall(r"fixed-seed eval loss: [\d.]+ at the start, ([\d.]+) at the end",
                           (peers.folder / f"{ns}.log").read_text(errors="replace"))
        if found:
            losses.append(float(found[-1]))
    if len(losses) < count:
        problems.append(f"{len(losses)}/{count} peers printed an eval loss")
    return Result(name, steps, wall, rounds, widths, samples / max(steps, 1) / target,
                  sum(losses) / len(losses) if losses else math.nan, problems, samples, losses)


def report(results: list[Result], args: argparse.Namespace, folder: Path) -> None:
    base = results[0]
    print(f"\nthree peers, target {args.target} samples (batch {BATCH}), {args.swarm_steps} swarm steps; wan: "
          f"{args.cap} each way, peer 3 at {args.slow_cap} sharing a core with a busy loop, peer 2 killed and "
          "restarted; solo: peer 1 alone on as many samples as the idle swarm")
    print(f"logs in {folder}")
    print(f"{'run':<5} {'swarm steps':>11} {'samples':>7} {'wall':>6} {'samples/step/target':>19} {'eval loss':>9} "
          f"{'vs idle':>7} {'spread max':>10} {'spread mean':>11}  rounds by outcome")
    for r in results:
        widths = list(r.spread.values())
        print(f"{r.run:<5} {r.swarm_steps:>11} {r.samples:>7} {r.wall:>5.0f}s {r.samples_per_step:>19.2f} "
              f"{r.eval_loss:>9.4f} "
              f"{r.eval_loss / base.eval_loss:>7.3f} {max(widths, default=math.nan):>10.3f} "
              f"{sum(widths) / max(len(widths), 1):>11.3f}  "
              + ", ".join(f"{k}: {v}" for k, v in sorted(r.rounds.items())) + (f"  ({'; '.join(r.problems)})"
                                                                                 if r.problems else ""))
    solo = next((r for r in results if r.run == "solo"), None)
    if solo is not None and base.losses and solo.losses:  # peer 1's eval batches in both: the same loss
        print(f"eval loss of the idle swarm / peer 1 alone, at equal samples ({base.samples} / {solo.samples}), on "
              f"peer 1's eval batches: {base.losses[0]:.4f} / {solo.losses[0]:.4f} = "
              f"{base.losses[0] / solo.losses[0]:.3f}")
    for r in results:
        print(f"spread by swarm step ({r.run}): " + " ".join(f"{s}:{w:.2f}" for s, w in r.spread.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swarm-steps", type=int, default=24, help="train.max_swarm_steps of the swarm's runs")
    parser.add_argument("--target", type=int, default=32, help="swarm.target_batch_size (batches of 4)")
    parser.add_argument("--runs", default="idle,solo,wan", help="which runs, in order (idle comes first)")
    parser.add_argument("--cap", default="20mbit", help="tbf rate on each direction of each peer's link (wan run)")
    parser.add_argument("--slow-cap", default="5mbit", help="peer 3's rate (wan run)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: network namespaces, veth, tc")
    sys.path.insert(0, str(ROOT / "src"))
    from sdswarm.model.loading import TINY_MODEL_ID, default_cache_dir, load_components

    args.cache = str(default_cache_dir())  # the built tiny model, shared with the peers
    load_components(TINY_MODEL_ID)  # built once, before the peers start
    folder = Path(tempfile.mkdtemp(prefix="sdswarm-wan-bench-"))
    results = []
    names = args.runs.split(",")
    if names[0] != "idle" or not set(names) <= {"idle", "solo", "wan"}:
        sys.exit("--runs: idle first, then solo and/or wan")
    for name in names:
        solo_steps = round(results[0].samples / args.target) if name == "solo" else 0
        print(f"{name}: " + (f"one peer to swarm step {solo_steps}" if solo_steps else
                             f"three peers to swarm step {args.swarm_steps}") + " ...", flush=True)
        results.append(run(name, args, folder / name, None if name == "idle" else folder / "idle", solo_steps))
        print(f"  {results[-1]}", flush=True)
    report(results, args, folder)


if __name__ == "__main__":
    main()
