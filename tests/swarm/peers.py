"""Real peers for the swarm tests: `sdswarm` processes on 127.0.0.1, each in its own process group."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sdswarm.swarm.invites import SWARM_KEY_FILE, load_swarm_key, make_invite
from sdswarm.swarm.settings import NodeSettings, save_settings
from tests.conftest import ROOT

# Small swarm settings for loopback on 2 cores (see the closing note of the swarm issue for why these).
SWARM_SETS = {
    "train.batch_size": 4,
    "swarm.target_batch_size": 32,
    "swarm.matchmaking_time": 5,
    "swarm.averaging_timeout": 20,
    "swarm.allreduce_timeout": 20,
    "swarm.load_state_timeout": 30,
    "output.checkpoint_every": 1000,
    "output.sample_every": 1000,
    "output.sample_steps": 2,
    "output.log_every": 2,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Peer:
    def __init__(self, name: str, folder: Path, *, join: str | None = None, max_steps: int = 40,
                 env: dict[str, str] | None = None, verbose: bool = True, **sets) -> None:
        self.name, self.out, self.join, self.env = name, folder / name, join, env or {}
        self.port = free_port()
        save_settings(NodeSettings(mode="relay", listen_host="127.0.0.1", ie_port_internal=self.port,
                                   dht_port_internal=0), self.out)
        # a joiner gets the swarm's settings from the relay; it sets only its own (output, batch size)
        shared = {k: v for k, v in SWARM_SETS.items() if join is None or not k.startswith("swarm.")}
        all_sets = {**shared, "output.dir": str(self.out), "train.max_steps": max_steps, **sets}
        self.args = ["-m", "sdswarm"] + (["join", join] if join else ["mother", "configs/tiny.yaml"])
        self.args += [f"--set={key}={value}" for key, value in all_sets.items()]
        self.args += ["--verbose"] if verbose else []  # the tests read hivemind's lines too
        self.log_path = folder / f"{name}.log"
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Peer:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **self.env}
        if self.join is not None and "SDSWARM_INVITE" not in env:  # invited by the swarm key of the test's mother
            keys = sorted(self.out.parent.glob(f"*/{SWARM_KEY_FILE}"))
            if keys:
                env["SDSWARM_INVITE"] = make_invite(load_swarm_key(keys[0].parent))
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, *self.args], cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def restart(self, *extra: str) -> Peer:
        """Start this peer again on its output folder (its identity, checkpoints, peers file), e.g. with --resume;
        its earlier log is kept as NAME.log.1."""
        self.log_path.rename(self.log_path.with_name(self.log_path.name + ".1"))
        self.args += list(extra)
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> list[dict]:
        return [r for r in self.records() if "step" in r]  # the trainer's lines (not rounds, not swarm steps)

    def records(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        # a line still being written (no newline yet) is read next time
        return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]

    def rounds(self) -> list[dict]:
        return [r["round"] for r in self.records() if "round" in r]

    def step(self) -> int:
        metrics = self.metrics()
        return metrics[-1]["step"] if metrics else 0

    def epoch(self) -> int:
        metrics = self.metrics()
        return metrics[-1]["local_epoch"] if metrics else 0

    def peer_id(self) -> str:
        found = re.search(r"DHT started \(peer id (\w+)\)", self.log())
        assert found, f"{self.name} has not started its DHT:\n{self.log()[-3000:]}"
        return found.group(1)

    def wait_until(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process is not None and self.process.poll() not in (None, 0):
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {what} did not happen in {timeout:.0f} s:\n{self.log()[-4000:]}")
            time.sleep(0.5)

    def wait_exit(self, timeout: float = 180) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit in {timeout:.0f} s:\n{self.log()[-4000:]}") from None

    def signal(self, sig: int) -> None:
        os.killpg(self.process.pid, sig)

    def group_alive(self, wait: float = 15.0) -> bool:
        """Whether any process of the peer's group is left `wait` seconds after (torch's shm manager lingers)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return False
            if time.monotonic() > deadline:
                return True
            time.sleep(0.2)

    def eval_losses(self) -> tuple[float, float]:
        found = re.search(r"fixed-seed eval loss: ([\d.]+) at the start, ([\d.]+) at the end", self.log())
        assert found, f"{self.name} printed no eval loss:\n{self.log()[-3000:]}"
        return float(found.group(1)), float(found.group(2))

    def kill(self) -> None:
        if self.process is not None and self.group_alive(wait=0):
            os.killpg(self.process.pid, signal.SIGKILL)


class Rogue:
    """A rogue peer (tests/swarm/rogue.py) in its own process group: it joins through `relay`'s public answer."""

    def __init__(self, relay: str, attack: str, folder: Path) -> None:
        self.args = ["-m", "tests.swarm.rogue", relay, attack]
        self.log_path = folder / f"rogue-{attack}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Rogue:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, *self.args], cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def peer_id(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while not (found := re.search(r"rogue peer id: (\S+)", self.log())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the rogue did not start:\n{self.log()[-3000:]}")
            time.sleep(0.5)
        return found.group(1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
