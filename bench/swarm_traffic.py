"""Swarm traffic figures (not a test): bytes per epoch against the model's size for each compression, the time a
late joiner needs to load the state, and epoch time under a bandwidth cap against uncapped, measured in one run.

    .venv/bin/python bench/swarm_traffic.py                  # none, fp16, uniform8bit, fp16 at 20mbit: ~9 min
    .venv/bin/python bench/swarm_traffic.py --compressions fp16 --cap 5mbit --low-cap 2mbit   # network-bound

Needs root (network namespaces, veth, tc). Each scenario starts two real `sdswarm` peers, each in a network
namespace of its own, joined by one veth pair (10.213.0.1 <-> 10.213.0.2): no other address is used, and the
namespaces go at the end of the scenario, also on an error or Ctrl-C. The veth byte counters (read through
/proc/PID/net/dev of each peer, every 0.2 s) are taken at the mother's epoch boundaries (its metrics.jsonl), over
the first run of whole epochs in which both peers averaged gradients together every epoch and neither log shows a
state download or a failed, skipped or cancelled round (the 1 -> 2 peer transition is turbulent in hivemind).

1. bytes sent/received per epoch per peer, against the trainable parameters in fp32 (4 bytes each), for each
   compression, against the uncompressed run of the same invocation and against theory (a 2-peer round sends the
   compressed tensor once each way; with swarm.average_state_every 1 an epoch is 2 rounds: gradients, parameters);
2. the late joiner (uncapped scenarios: the mother trains alone first): its process start to the state request,
   the first load_state_from_peers and the bytes it received, and the time until its first round with both peers;
3. the pair with `tc tbf` on both veth ends (each direction capped): seconds per epoch against the uncapped run
   with the same compression. Capped pairs start together behind the start-up barrier: with the tiny model a
   solo mother finishes an epoch faster than a capped joiner downloads the state, so a late joiner re-downloads
   forever (--cap-late-join shows it).

Also printed: a compress/decompress round trip of each compression in this environment, and the rounds per window
with hivemind's partial-round warnings ('received X% of ...'), which it logs while still reporting success.
Peers run as in tests/swarm/peers.py: their own process group, OMP_NUM_THREADS=1, killed at the end of each
scenario. Timings on a shared 2-core machine are noisy: compare ratios from one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.213.0"  # the only addresses used: inside the two namespaces this script creates
IE_PORT, DHT_PORT = 8765, 31337
ROLES = ("mother", "joiner")
BYTES_PER_ELEMENT = {"none": 4, "fp16": 2, "uniform8bit": 1}  # the 8-bit codebook (256 floats a part) left out
POLL = 0.2  # seconds between samples of the byte counters
CHECK = 1.0  # seconds between looks at the peers' logs and metrics


# --- the network: two namespaces and one veth pair ----------------------------------------------------------


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


class Link:
    """Namespaces `<tag>m` (mother, .1) and `<tag>j` (joiner, .2) joined by veth `<tag>m` <-> `<tag>j`."""

    def __init__(self, tag: str) -> None:
        self.ns = {"mother": f"{tag}m", "joiner": f"{tag}j"}
        self.dev = dict(self.ns)  # each end is named after its namespace
        self.ip = {"mother": f"{SUBNET}.1", "joiner": f"{SUBNET}.2"}

    def __enter__(self) -> Link:
        try:
            for ns in self.ns.values():
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            m, j = self.ns["mother"], self.ns["joiner"]
            sh("ip", "link", "add", self.dev["mother"], "netns", m, "type", "veth", "peer", "name", self.dev["joiner"],
               "netns", j)
            for role, ns in self.ns.items():
                sh("ip", "-n", ns, "addr", "add", f"{self.ip[role]}/24", "dev", self.dev[role])
                sh("ip", "-n", ns, "link", "set", self.dev[role], "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cap(self, rate: str) -> None:
        """tbf on the egress of both ends: each direction is capped at `rate`."""
        for role, ns in self.ns.items():
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", self.dev[role], "root", "tbf", "rate", rate,
               "burst", "32kbit", "latency", "400ms")

    def close(self) -> None:
        for ns in self.ns.values():
            listed = sh("ip", "netns", "pids", ns, check=False)
            for pid in listed.stdout.split():  # only processes this script started inside its own namespace
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)  # takes its veth end (and so the pair) with it


def read_counters(pid: int, dev: str) -> tuple[int, int] | None:
    """(tx_bytes, rx_bytes) of `dev` in the network namespace of process `pid` (/proc/PID/net/dev)."""
    try:
        text = Path(f"/proc/{pid}/net/dev").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == dev:
            cols = rest.split()
            return int(cols[8]), int(cols[0])
    return None


# --- peers ------------------------------------------------------------------------------------------------


# searched, not matched: a progress bar drawn with \r may precede a log line
SDSWARM_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) [A-Z]+ ")
HIVEMIND_TIME = re.compile(r"([A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d\.\d{3}) \[")


def line_time(line: str) -> float | None:
    """The wall-clock time a log line was written, from sdswarm's or hivemind's timestamp format."""
    if found := SDSWARM_TIME.search(line):
        return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    if found := HIVEMIND_TIME.search(line):
        year = time.localtime().tm_year
        return datetime.strptime(f"{year} {found.group(1)}", "%Y %b %d %H:%M:%S.%f").timestamp()
    return None


class Peer:
    def __init__(self, role: str, link: Link, folder: Path, cli: list[str], cache: str) -> None:
        self.role, self.link, self.out = role, link, folder / role
        self.cli, self.cache = cli, cache
        self.log_path = folder / f"{role}.log"
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> Peer:
        from sdswarm.swarm.settings import NodeSettings, save_settings

        save_settings(NodeSettings(mode="relay", listen_host=self.link.ip[self.role], ie_port_internal=IE_PORT,
                                   dht_port_internal=DHT_PORT), self.out)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SDSWARM_CACHE": self.cache}
        command = ["ip", "netns", "exec", self.link.ns[self.role], sys.executable, "-m", "sdswarm", *self.cli,
                   "--output", str(self.out)]
        with open(self.log_path, "w") as log:
            self.started_at = time.time()
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_time(self, text: str) -> float | None:
        """When the first log line holding `text` was written."""
        for line in self.log().splitlines():
            if text in line:
                return line_time(line)
        return None

    def metrics(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        rows = []
        if path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a line being written
                    rows.append(json.loads(line))
        return [row for row in rows if "step" in row]  # the trainer's lines (not rounds, not fingerprints)

    def epoch(self) -> int:
        rows = self.metrics()
        return rows[-1]["local_epoch"] if rows else -1

    def counters(self) -> tuple[int, int] | None:
        return read_counters(self.process.pid, self.link.dev[self.role]) if self.process else None

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.role} exited with {self.process.returncode}:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)


# --- one scenario ------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    compression: str
    cap: str | None = None
    late_join: bool = True
    timeout_scale: float = 1.0
    epochs: int | None = None  # None: --epochs
    budget: float = 1.0  # x --scenario-timeout


@dataclass
class Result:
    scenario: Scenario
    epochs: int = 0
    seconds_per_epoch: float = float("nan")
    sent: dict = field(default_factory=dict)  # role -> bytes per epoch
    received: dict = field(default_factory=dict)
    start_to_join: float = float("nan")  # the late joiner: process start -> its first log line (imports)
    start_to_download: float = float("nan")  # the late joiner: process start -> "downloading the current state"
    download_seconds: float = float("nan")  # -> "caught up" (its first load_state_from_peers)
    download_bytes: float = float("nan")  # received meanwhile
    start_to_in_sync: float = float("nan")  # process start -> its first gradient round with both peers
    join_downloads: int = 0  # state downloads (hivemind's "Downloading parameters") until then
    join_bytes: float = float("nan")  # received from the download request until then
    window_downloads: dict = field(default_factory=dict)  # role -> state downloads inside the measured window
    window_epochs: tuple[int, int] | None = None  # the mother's epochs whose boundaries delimit the window
    partial: dict = field(default_factory=dict)  # role -> hivemind "received N% ..." warnings in the window
    grad_rounds: dict = field(default_factory=dict)  # role -> "Averaged gradients with 2 peers" in the window
    state_rounds: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    wall: float = 0.0


class Timeline:
    """Samples of (time, mother tx, mother rx, joiner tx, joiner rx); counters are read between samples."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, dict]] = []

    def sample(self, peers: dict[str, Peer]) -> None:
        values = {}
        for role, peer in peers.items():
            if peer.process is not None and (c := peer.counters()) is not None:
                values[role] = c
        self.rows.append((time.time(), values))

    def at(self, role: str, when: float) -> tuple[float, float] | None:
        """(tx, rx) of `role` at `when`, linearly between the two nearest samples."""
        points = [(t, v[role]) for t, v in self.rows if role in v]
        if not points or when < points[0][0] or when > points[-1][0]:
            return None
        for (t0, a), (t1, b) in zip(points, points[1:], strict=False):
            if t0 <= when <= t1:
                f = 0.0 if t1 == t0 else (when - t0) / (t1 - t0)
                return a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1])
        return points[-1][1]


def epoch_start_times(rows: list[dict]) -> dict[int, float]:
    """Epoch -> the time of the first metrics line at that local epoch (its first step after the transition)."""
    starts: dict[int, float] = {}
    for row in rows:
        starts.setdefault(row["local_epoch"], row["time"])
    return starts


TWO_PEERS = "Averaged gradients with 2 peers"
# what makes a stretch of epochs unclean: a state download, a failed or cancelled averaging step
TROUBLE = ("Downloading parameters", "out of sync", "failed", "could not find a group", "Task exception",
           "Skipped averaging", "there are no other peers", "Proceeding with local gradients")
ALONE = "there are no other peers"  # hivemind's tracker sees no other peer: it trains on alone
# hivemind's "Averaged ... with 2 peers" is logged even when a part of the tensors never arrived
PARTIAL = re.compile(r"received \d+(\.\d+)?% ")


def timed_lines(peer: Peer) -> list[tuple[float, str]]:
    """The peer's log lines that carry a timestamp, with it (read on from where the last call stopped)."""
    state = peer.__dict__.setdefault("_timed", {"offset": 0, "lines": []})
    if peer.log_path.exists():
        with open(peer.log_path, "rb") as handle:
            handle.seek(state["offset"])
            chunk = handle.read()
        end = chunk.rfind(b"\n") + 1  # whole lines only
        state["offset"] += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            if (t := line_time(line)) is not None:
                state["lines"].append((t, line))
    return state["lines"]


def trouble_times(peers: dict[str, Peer]) -> list[float]:
    return sorted(t for peer in peers.values() for t, line in timed_lines(peer) if any(m in line for m in TROUBLE))


def settled(peers: dict[str, Peer], rounds: int = 2) -> bool:
    """Both peers averaged gradients together `rounds` times since the last trouble line in either log."""
    last = max(trouble_times(peers), default=0.0)
    return all(sum(TWO_PEERS in line and t > last for t, line in timed_lines(peer)) >= rounds
               for peer in peers.values())


def split(peers: dict[str, Peer], span: float = 60.0) -> bool:
    """The pair fell apart: for `span` seconds each peer has said, again and again, that it sees no other peer,
    neither averaged with the other, and neither was downloading the state (a peer that downloads stops
    reporting progress, so the other one briefly looks alone)."""
    now = time.time()
    recent = [[line for t, line in timed_lines(peer) if t > now - span] for peer in peers.values()]
    return all(sum(ALONE in line for line in lines) >= 3 and not any(
        TWO_PEERS in line or "ownloading" in line for line in lines) for lines in recent)


def find_window(peers: dict[str, Peer], first: int, epochs: int, clean: bool = True) -> tuple[int, int] | None:
    """The first `epochs` whole epochs from `first` on that both peers finished, with a gradient round with both
    peers in each on the mother and no trouble line in either log (clean=False: the one with the fewest)."""
    mother, joiner = peers["mother"], peers["joiner"]
    starts, joiner_starts = epoch_start_times(mother.metrics()), epoch_start_times(joiner.metrics())
    trouble = trouble_times(peers)
    rounds = [t for t, line in timed_lines(mother) if TWO_PEERS in line]
    best, best_count = None, None
    for e in sorted(starts):
        if e < first or e + epochs not in starts or e + epochs not in joiner_starts:
            continue
        t0, t1 = starts[e], starts[e + epochs]
        count = sum(t0 - 1 <= t <= t1 for t in trouble) + max(0, epochs - sum(t0 <= t <= t1 for t in rounds))
        if count == 0:
            return e, e + epochs
        if not clean and (best_count is None or count < best_count):
            best, best_count = (e, e + epochs), count
    return best


def run_scenario(scenario: Scenario, args: argparse.Namespace, folder: Path, tag: str) -> Result:
    """Start the pair, measure, stop it. A timeout or a dead peer ends the scenario early: what was measured
    until then is kept, and the reason is noted."""
    result, began = Result(scenario), time.time()
    folder.mkdir(parents=True)
    scale = scenario.timeout_scale
    swarm_sets = {
        "swarm.run_id": "bench-" + re.sub(r"[^A-Za-z0-9_.-]", "-", scenario.name),
        "swarm.compression": scenario.compression,
        "swarm.target_batch_size": args.target_batch_size,
        "swarm.matchmaking_time": args.matchmaking_time,
        "swarm.averaging_timeout": args.averaging_timeout * scale,
        "swarm.allreduce_timeout": args.averaging_timeout * scale,
        "swarm.load_state_timeout": args.averaging_timeout * scale * 2,
        "swarm.min_peers": 1 if scenario.late_join else 2,
        "swarm.access": "open",  # traffic, not admission (tests/swarm/test_swarm.py joins with invites)
        **dict(pair.split("=", 1) for pair in args.mother_sets),
    }
    own_sets = {"train.batch_size": args.batch_size, "train.max_steps": 100000, "output.log_every": 1,
                "output.checkpoint_every": 10**8, "output.sample_every": 10**8, "output.sample_steps": 1}
    # --verbose: the window is found in hivemind's own lines ("Averaged gradients with 2 peers"), which a node
    # otherwise keeps in its log file
    mother_cli = (["mother", "configs/tiny.yaml", "--verbose"]
                  + [f"--set={k}={v}" for k, v in {**swarm_sets, **own_sets}.items()])
    joiner_cli = ["join", f"{SUBNET}.1:{IE_PORT}", "--verbose"] + [f"--set={k}={v}" for k, v in own_sets.items()]

    with Link(tag) as link:
        if scenario.cap:
            link.cap(scenario.cap)
        peers = {role: Peer(role, link, folder, cli, args.cache)
                 for role, cli in (("mother", mother_cli), ("joiner", joiner_cli))}
        timeline = Timeline()
        scenario_deadline = time.monotonic() + args.scenario_timeout * scenario.budget

        def joiner_training() -> bool:  # 30 s after its first step
            rows = peers["joiner"].metrics()
            return bool(rows) and time.time() - rows[0]["time"] > 30

        def wait(condition, what: str, timeout: float) -> None:
            """Sample the counters every POLL seconds until `condition()` (checked every CHECK seconds)."""
            deadline = min(time.monotonic() + timeout, scenario_deadline)
            while True:
                timeline.sample(peers)
                if condition():
                    return
                for peer in peers.values():
                    peer.check_alive()
                if joiner_training() and split(peers):
                    raise RuntimeError("the pair split: for 60 s both peers trained alone, each seeing no other "
                                       "peer in the DHT")
                if time.monotonic() > deadline:
                    limit = "the scenario's time limit" if deadline == scenario_deadline else f"{timeout:.0f} s"
                    raise TimeoutError(f"{what} did not happen within {limit}")
                next_check = time.monotonic() + CHECK
                while time.monotonic() < next_check:
                    time.sleep(POLL)
                    timeline.sample(peers)

        try:
            measure(scenario, args, peers, wait, result)
        except (TimeoutError, RuntimeError) as exc:
            result.problems.append(f"stopped early: {str(exc)[-1500:]}")
            print(f"  {scenario.name}: {str(exc)[-600:]}", file=sys.stderr, flush=True)
        finally:
            for peer in peers.values():
                peer.kill()
            if args.keep:
                (folder / "timeline.json").write_text(json.dumps(timeline.rows))
        if scenario.late_join:
            join_figures(peers["joiner"], timeline, result)
        window_figures(peers, timeline, result)
    result.wall = time.time() - began
    return result


def measure(scenario: Scenario, args: argparse.Namespace, peers: dict[str, Peer], wait, result: Result) -> None:
    mother, joiner = peers["mother"], peers["joiner"]
    scale, epochs = scenario.timeout_scale, scenario.epochs or args.epochs
    mother.start()
    wait(lambda: "others join this swarm with" in mother.log(), "the mother's relay", 180)
    if scenario.late_join:  # the joiner's own start-up (imports, model) gives the mother a few epochs more
        wait(lambda: mother.epoch() >= args.solo_epochs, f"the mother's {args.solo_epochs} solo epochs", 180)
    joiner.start()
    if scenario.late_join:
        wait(lambda: "caught up: now at swarm step" in joiner.log(), "the late joiner's first state download",
             180 + args.averaging_timeout * scale * 2)
    wait(lambda: settled(peers), "two clean gradient rounds on both peers (no state download or failure since)",
         args.settle_timeout * scale)
    if not scenario.late_join and "caught up" in joiner.log():
        result.problems.append("the joiner downloaded the state although both started together")
    first = mother.epoch() + 1 + args.warmup_epochs  # from the next epoch boundary: whole epochs
    per_epoch = max(30.0, 3 * args.averaging_timeout) * scale
    found = lambda: find_window(peers, first, epochs)  # noqa: E731
    try:
        wait(lambda: found() is not None, f"{epochs} clean epochs in a row", per_epoch * (epochs + args.extra_epochs))
        result.window_epochs = found()
    finally:  # also on a timeout or a split: the least troubled stretch, if any, with a note
        if result.window_epochs is None:
            result.window_epochs = find_window(peers, first, epochs, clean=False)
            if result.window_epochs:
                result.problems.append(f"no {epochs} clean epochs in a row: measured the least troubled stretch")


def join_figures(joiner: Peer, timeline: Timeline, result: Result) -> None:
    joined = joiner.log_time("joining run")
    asked = joiner.log_time("downloading the current state")
    done = joiner.log_time("caught up: now at swarm step")
    in_sync = joiner.log_time(TWO_PEERS)
    since = lambda t: t - joiner.started_at if t else float("nan")  # noqa: E731
    result.start_to_join, result.start_to_download = since(joined), since(asked)
    result.start_to_in_sync = since(in_sync)
    if asked and done:
        result.download_seconds = done - asked
        if (before := timeline.at("joiner", asked)) and (after := timeline.at("joiner", done)):
            result.download_bytes = after[1] - before[1]
    result.join_downloads = sum("Downloading parameters" in line and t <= (in_sync or time.time())
                                for t, line in timed_lines(joiner))
    until = (in_sync or timeline.rows[-1][0]) if timeline.rows else None
    if asked and until and (before := timeline.at("joiner", asked)) and (after := timeline.at("joiner", until)):
        result.join_bytes = after[1] - before[1]


def window_figures(peers: dict[str, Peer], timeline: Timeline, result: Result) -> None:
    if result.window_epochs is None:
        return
    first, last = result.window_epochs
    starts = epoch_start_times(peers["mother"].metrics())
    reached = [e for e in range(first, last + 1) if e in starts]
    if len(reached) < 2:
        return
    t0, t1 = starts[reached[0]], starts[reached[-1]]
    result.epochs = n = reached[-1] - reached[0]
    result.seconds_per_epoch = (t1 - t0) / n
    for role, peer in peers.items():
        if (a := timeline.at(role, t0)) and (b := timeline.at(role, t1)):
            result.sent[role], result.received[role] = (b[0] - a[0]) / n, (b[1] - a[1]) / n
        window = [line for t, line in timed_lines(peer) if t0 <= t <= t1]
        result.grad_rounds[role] = sum(TWO_PEERS in line for line in window)
        result.state_rounds[role] = sum("Averaged parameters with 2 peers" in line for line in window)
        result.window_downloads[role] = sum("Downloading parameters" in line for line in window)
        result.partial[role] = sum(bool(PARTIAL.search(line)) for line in window)
        trouble = [line for line in window if any(t in line for t in TROUBLE)]
        if trouble:
            result.problems.append(f"{role}: {len(trouble)} trouble line(s) in the measured window, first: "
                                   f"{trouble[0][:160]}")
        errors = [line for line in window if " ERROR " in line or "[ERROR]" in line]
        if errors:
            result.problems.append(f"{role}: {len(errors)} ERROR line(s) in the window, e.g. {errors[-1][:140]}")
        if epoch_start_times(peer.metrics()).get(reached[-1]) is None:
            result.problems.append(f"{role} did not reach epoch {reached[-1]}")


# --- report ------------------------------------------------------------------------------------------------


def rounds_text(r: Result) -> str:
    """Averaging rounds with 2 peers in the window, gradients/parameters, mother then joiner; (Np): partial ones."""
    return " ".join(f"{r.grad_rounds.get(role, 0)}/{r.state_rounds.get(role, 0)}"
                    + (f"({r.partial[role]}p)" if r.partial.get(role) else "") for role in ROLES)


def secs(value: float) -> str:
    return "-" if value != value else f"{value:.1f} s"


def mb(value: float) -> str:
    return "-" if value != value else f"{value / 1e6:.2f} MB"


def ratio(value: float, base: float) -> str:
    return "-" if value != value or base != base or not base else f"{value / base:.2f}x"


def table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "(no such scenario in this run)"
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def report(results: list[Result], param_count: int, parts: dict[str, int], args: argparse.Namespace) -> str:
    fp32 = 4 * param_count
    nan = float("nan")
    checks = ", ".join(f"{name} {verdict}" for name, verdict in compression_check().items())
    parts_text = ", ".join(f"{k} {v:,}" for k, v in parts.items())
    out = ["command: " + " ".join(sys.argv),
           f"compression round trip in this environment: {checks}",
           f"model builtin:tiny{' (LoRA adapters)' if 'train.lora=' in ' '.join(args.mother_sets) else ''}: "
           f"{param_count:,} trainable parameters ({parts_text}) = {mb(fp32)} in fp32",
           f"swarm: 2 peers, target batch {args.target_batch_size}, batch {args.batch_size}, matchmaking "
           f"{args.matchmaking_time:g} s, averaging timeout {args.averaging_timeout:g} s (x2 under --cap, x4 under "
           "--low-cap); window: the first run of whole epochs, once both peers averaged twice since the last "
           "trouble, with a 2-peer gradient round in each and no state download, failed or skipped round in "
           "either log", ""]

    uncapped = [r for r in results if r.scenario.cap is None]
    base = next((r for r in uncapped if r.scenario.compression == "none"), None)

    def per_peer(r: Result, values: dict) -> float:  # mean over the two peers
        return sum(values.values()) / len(values) if values else nan

    rows = []
    for r in uncapped:
        sent = per_peer(r, r.sent)
        # a round between 2 peers: each sends the half the other reduces and the averaged half it reduced back
        rounds_per_epoch = (r.grad_rounds.get("mother", 0) + r.state_rounds.get("mother", 0)) / max(r.epochs, 1)
        expected = rounds_per_epoch * param_count * BYTES_PER_ELEMENT[r.scenario.compression]
        rounds = rounds_text(r)
        downloads = " ".join(str(r.window_downloads.get(role, 0)) for role in ROLES)
        rows.append([r.scenario.compression, str(r.epochs), f"{r.seconds_per_epoch:.2f}",
                     *(mb(getattr(r, kind).get(role, nan)) for role in ROLES for kind in ("sent", "received")),
                     f"{sent / fp32:.2f}", ratio(sent, per_peer(base, base.sent) if base else nan),
                     f"{expected / fp32:.2f}", mb(sent - expected),
                     f"{(sent - expected) / r.seconds_per_epoch / 1e3:.0f} kB/s", rounds, downloads])
    out += ["1. bytes per epoch per peer on the veth between the two namespaces, uncapped. fp32 = the trainable "
            "parameters x 4 bytes. rounds: averaging rounds with 2 peers in the window, gradients/parameters, mother "
            "then joiner; (Np): N hivemind warnings 'received X% of ...' (a partial round: a part never arrived). "
            "theory: the mother's rounds per epoch x parameters x bytes per element (a 2-peer round sends 1x the "
            "compressed tensor each way); extra: measured - theory. downloads: state downloads in the window",
            table(["compression", "epochs", "s/epoch", "mother sent", "mother recv", "joiner sent", "joiner recv",
                   "sent/peer / fp32", "vs none", "theory / fp32", "extra/epoch", "extra rate", "rounds",
                   "downloads"], rows), ""]

    rows = []
    for r in results:
        if not r.scenario.late_join:
            continue
        rate = r.download_bytes / r.download_seconds if r.download_seconds == r.download_seconds else nan
        rows.append([r.scenario.name, secs(r.start_to_join), secs(r.start_to_download), secs(r.download_seconds),
                     mb(r.download_bytes), f"{r.download_bytes / fp32:.2f}",
                     "-" if rate != rate else f"{rate * 8 / 1e6:.0f} Mbit/s", secs(r.start_to_in_sync),
                     str(r.join_downloads), mb(r.join_bytes)])
    out += ["2. late joiner: loading the state. Columns from the joiner's process start: its first log line (imports "
            "done), its request for the state, that first load (hivemind sends it uncompressed: parameters and Adam's "
            "two moments; sdswarm skips the gradient buffers), its first gradient round with both peers; downloads: "
            "hivemind 'Downloading parameters' lines until then (1 per load)",
            table(["scenario", "start -> log", "start -> request", "first load", "received", "/ fp32 params", "rate",
                   "start -> 2-peer round", "downloads", "received till then"], rows), ""]

    rows = []
    for r in results:
        if r.scenario.compression != args.cap_compression:
            continue
        base_r = next((u for u in uncapped if u.scenario.compression == r.scenario.compression), None)
        busiest = max([*r.sent.values(), *r.received.values()], default=nan)
        link = nan
        if r.scenario.cap:
            rate_bits = parse_rate(r.scenario.cap)
            link = busiest * 8 / rate_bits / r.seconds_per_epoch if rate_bits else nan
        rows.append([r.scenario.cap or "uncapped", str(r.epochs), f"{r.seconds_per_epoch:.2f}",
                     ratio(r.seconds_per_epoch, base_r.seconds_per_epoch if base_r else nan), mb(busiest),
                     "-" if link != link else f"{100 * link:.0f}%", rounds_text(r),
                     "late join" if r.scenario.late_join else "barrier start"])
    out += [f"3. bandwidth cap (tbf on both veth ends), compression {args.cap_compression}: epoch time against "
            "uncapped",
            table(["cap", "epochs", "s/epoch", "vs uncapped", "busiest direction/epoch", "cap busy", "rounds",
                   "start"], rows), ""]

    problems = [f"  {r.scenario.name}: {p}" for r in results for p in r.problems]
    problems += [f"  {r.scenario.name}: {sum(r.partial.values())} partial-round warnings in the window: a peer's part "
                 "never arrived, so it was left out of the average (the round is still logged as 'Averaged ... with 2 "
                 "peers'); besides a failing decompression, hivemind.Optimizer's next_chunk_timeout (= "
                 "matchmaking_time unless given) cuts off a sender whose next chunk takes longer"
                 for r in results if sum(r.partial.values())]
    out += ["notes:" if problems else "notes: no averaging failures or warnings in the measured windows", *problems]
    out.append("scenario wall times: " + ", ".join(f"{r.scenario.name} {r.wall:.0f} s" for r in results))
    return "\n".join(out)


def compression_check() -> dict[str, str]:
    """Compress and decompress a tensor with each of the config's compressions, in this environment."""
    from sdswarm.swarm.optimizer import COMPRESSIONS, check_compression

    verdicts = {}
    for name in COMPRESSIONS:
        try:
            size, error = check_compression(name)
            verdicts[name] = f"ok ({size:.2f} B/value, max error {error:.1g})"
        except RuntimeError as exc:  # the finding itself: report it, do not stop
            verdicts[name] = f"FAILS ({exc})"
    return verdicts


def parse_rate(rate: str) -> float:
    """tc's rate syntax (20mbit, 500kbit, 1gbit) in bits per second; 0 when not understood."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not found:
        return 0.0
    return float(found.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[found.group(2)]


# --- main ----------------------------------------------------------------------------------------------------


def prepare_cache(cache: str, mother_sets: list[str]) -> tuple[int, dict[str, int]]:
    """Build the tiny model and demo data into the cache once (never inside a timed phase); count the trainable
    parameters: the model's, or with --set train.lora=... its adapters' (what hivemind averages in LoRA mode)."""
    os.environ["SDSWARM_CACHE"] = cache
    import yaml

    from sdswarm.data.demo import make_demo_index
    from sdswarm.model.loading import load_components
    from sdswarm.node import demo_dir

    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    components = load_components(tiny["model"])
    lora = dict(pair.split("=", 1) for pair in mother_sets).get("train.lora")
    if lora is not None:
        from sdswarm.config import LoraConfig
        from sdswarm.model.lora import add_adapters

        add_adapters(components, LoraConfig(**yaml.safe_load(lora)), text_encoder=tiny["train_text_encoder"], seed=0)
        components.vae.requires_grad_(False)
    parts = {"unet": sum(p.numel() for p in components.unet.parameters() if p.requires_grad)}
    if tiny.get("train_text_encoder"):
        parts["text encoder"] = sum(p.numel() for p in components.text_encoder.parameters() if p.requires_grad)
    try:
        make_demo_index(demo_dir())
    except Exception as exc:  # the first peer builds it then; only the first scenario's solo phase pays
        print(f"note: could not prepare the demo data here ({exc}); the first peer will", file=sys.stderr)
    return sum(parts.values()), parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--compressions", default="none,fp16,uniform8bit", help="uncapped scenarios (default: %(default)s)")
    add("--cap", default="20mbit", help="tbf rate of the capped scenario; '' skips it (default: %(default)s)")
    add("--low-cap", default="", help="a second, much lower cap, e.g. 2mbit (barrier start, no late join)")
    add("--cap-compression", default="fp16", help="compression of the capped runs (default: %(default)s)")
    add("--epochs", type=int, default=4, help="epochs measured per scenario (default: %(default)s)")
    add("--cap-late-join", action="store_true",
        help="under --cap, start the joiner late as in the uncapped runs (default: both start together behind the "
             "start-up barrier: with the tiny model a late joiner may never catch up, see the docstring)")
    add("--low-cap-epochs", type=int, default=2, help="epochs measured under --low-cap (default: %(default)s)")
    add("--scenario-timeout", type=float, default=300.0,
        help="seconds a scenario may take (x1.5 under --cap, x2 under --low-cap) before what it has is reported")
    add("--extra-epochs", type=int, default=6,
        help="epochs beyond --epochs to wait for a clean stretch before measuring the least troubled one")
    add("--warmup-epochs", type=int, default=0, help="clean epochs skipped before the window (default: %(default)s)")
    add("--settle-timeout", type=float, default=120.0,
        help="how long to wait for two clean 2-peer rounds before the window (default: %(default)s)")
    add("--solo-epochs", type=int, default=1, help="mother's epochs before the joiner starts (default: %(default)s)")
    add("--target-batch-size", type=int, default=32)
    add("--batch-size", type=int, default=4)
    add("--matchmaking-time", type=float, default=3.0)
    add("--averaging-timeout", type=float, default=15.0,
        help="also allreduce; load-state gets 2x; x2 under --cap, x4 under --low-cap (default: %(default)s)")
    add("--cache", default="/tmp/bench-cache", help="SDSWARM_CACHE of the peers (default: %(default)s)")
    add("--set", dest="mother_sets", action="append", default=[], metavar="KEY=VALUE",
        help="another config key for the mother (the swarm's settings reach the joiner through it), "
             "e.g. swarm.average_state_every=10")
    add("--keep", metavar="DIR", help="keep the peers' outputs and logs in DIR")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        print("error: needs root and iproute2 (ip, tc): network namespaces, veth pairs and tbf", file=sys.stderr)
        return 2

    scenarios = [Scenario(c, c) for c in args.compressions.split(",") if c]
    if args.cap:
        scenarios.append(Scenario(f"{args.cap_compression}@{args.cap}", args.cap_compression, cap=args.cap,
                                  late_join=args.cap_late_join, timeout_scale=2.0, budget=1.5))
    if args.low_cap:
        scenarios.append(Scenario(f"{args.cap_compression}@{args.low_cap}", args.cap_compression, cap=args.low_cap,
                                  late_join=False, timeout_scale=4.0, epochs=args.low_cap_epochs, budget=2.0))

    if args.keep and Path(args.keep).exists() and any(Path(args.keep).iterdir()):
        print(f"error: --keep {args.keep} is not empty (a peer would append to old metrics)", file=sys.stderr)
        return 2

    # SIGTERM/SIGHUP unwind like Ctrl-C, so the namespaces and peers are always removed
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    began = time.time()
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sdswarm-traffic-"))
    try:
        print(f"preparing the tiny model and demo data in {args.cache} ...", flush=True)
        param_count, parts = prepare_cache(args.cache, args.mother_sets)
        results = []
        for i, scenario in enumerate(scenarios):
            print(f"[{time.time() - began:5.0f} s] scenario {scenario.name} ...", flush=True)
            tag = f"sdsb{os.getpid() % 100000}{i}"
            try:
                results.append(run_scenario(scenario, args, workdir / scenario.name.replace("@", "-"), tag))
            except KeyboardInterrupt:  # the scenario cleaned up after itself; report what is done
                print("interrupted: the figures of the scenarios finished so far", file=sys.stderr)
                break
        print()
        print(report(results, param_count, parts, args))
        print(f"total run time {time.time() - began:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
