"""DiLoCo against every-step sync (not a test): three tiny-model peers, the same samples each, on 20 Mbit/s links.

    sudo .venv/bin/python bench/diloco.py                      # fp16, scaled_fp16, DiLoCo H=10/50/100: ~20 min
    sudo .venv/bin/python bench/diloco.py --variants h10 --steps 60

Needs root. Each peer runs in a network namespace of its own (10.214.0.1-3), joined to a bridge in a fourth;
`tc tbf` caps each direction of each peer's link. Every variant trains each peer for `--steps` batches (equal
samples), then prints, against the fp16 run of the same invocation: the fixed-seed eval loss at the end (the mean
over the peers), the bytes each peer sent (its veth's tx counter), the wall time, the swarm steps and what the
start-up estimate (swarm/costs.py) predicted for those swarm steps; and per mode the late joiner's download in
bytes per parameter, as the node computes it. Timings on a shared machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from swarm_traffic import read_counters, sh

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.214.0"
IE_PORT, DHT_PORT = 8765, 31337
VARIANTS = {
    "fp16": {"swarm.sync": "every_step", "swarm.compression": "fp16"},
    "scaled_fp16": {"swarm.sync": "every_step", "swarm.compression": "scaled_fp16"},
    "h10": {"swarm.sync": "local_steps", "swarm.local_steps": 10},
    "h50": {"swarm.sync": "local_steps", "swarm.local_steps": 50},
    "h100": {"swarm.sync": "local_steps", "swarm.local_steps": 100},
}


class Bridge:
    """Namespaces sdd1..sdd3 (peers) with veth pairs into a bridge in namespace `sddhub`, each side capped
    (another `prefix` and `subnet` for another bench beside this one; `caps`: one peer's own cap, by index)."""

    def __init__(self, peers: int, cap: str, *, prefix: str = "sdd", subnet: str = SUBNET,
                 caps: dict[int, str] | None = None) -> None:
        self.names = [f"{prefix}{i}" for i in range(1, peers + 1)]
        self.hub, self.subnet, self.cap, self.caps = f"{prefix}hub", subnet, cap, caps or {}

    def address(self, index: int) -> str:
        """The IP address of peer `index` (1-based)."""
        return f"{self.subnet}.{index}"

    def __enter__(self) -> Bridge:
        hub = self.hub
        try:
            for ns in [hub, *self.names]:
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", hub, "link", "set", "br0", "up")
            for i, ns in enumerate(self.names, start=1):
                sh("ip", "link", "add", ns, "netns", ns, "type", "veth", "peer", "name", f"h{ns}", "netns", hub)
                sh("ip", "-n", hub, "link", "set", f"h{ns}", "master", "br0", "up")
                sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", ns)
                sh("ip", "-n", ns, "link", "set", ns, "up")
                for where, dev in ((ns, ns), (hub, f"h{ns}")):  # the peer's upload and its download
                    sh("ip", "netns", "exec", where, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                       self.caps.get(i, self.cap), "burst", "32kbit", "latency", "400ms")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ns in [*self.names, self.hub]:
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():  # only what this script started
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)


@dataclass
class Result:
    variant: str
    eval_loss: float
    sent_mb: float  # mean over the peers
    wall: float
    swarm_steps: int
    estimate_mb: float  # the start-up estimate per swarm step (3 peers) x the swarm steps
    problems: str = ""


def run_variant(name: str, args: argparse.Namespace, folder: Path) -> Result:
    from sdswarm.swarm.settings import NodeSettings, save_settings

    sets = {"swarm.run_id": f"bench-{name}", "swarm.min_peers": 3, "swarm.target_batch_size": 3 * 4 * args.batch,
            "swarm.matchmaking_time": 5, "swarm.averaging_timeout": 60, "swarm.allreduce_timeout": 60,
            "swarm.uplink_mbit": float(args.cap.removesuffix("mbit")), "train.batch_size": args.batch,
            "output.checkpoint_every": 10**8, "output.sample_every": 10**8, "output.sample_steps": 1,
            "output.log_every": 5, "swarm.access": "open", **VARIANTS[name]}  # open: traffic, not admission
    own = {"train.max_steps": args.steps, "train.batch_size": args.batch}
    processes, began = [], time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SDSWARM_CACHE": args.cache}
    with Bridge(3, args.cap) as bridge:
        for i, ns in enumerate(bridge.names, start=1):
            out = folder / name / ns
            save_settings(NodeSettings(mode="relay", listen_host=f"{SUBNET}.{i}", ie_port_internal=IE_PORT,
                                       dht_port_internal=DHT_PORT), out)
            cli = (["mother", "configs/tiny.yaml", *(f"--set={k}={v}" for k, v in {**sets, **own}.items())] if i == 1
                   else ["join", f"{SUBNET}.1:{IE_PORT}", *(f"--set={k}={v}" for k, v in own.items())])
            log = open(folder / name / f"{ns}.log", "w")  # noqa: SIM115 (closed with the process)
            processes.append((ns, out, log, subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "sdswarm", *cli, "--output", str(out)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)))
            if i == 1:
                time.sleep(20)  # the relay first
        sent, deadline = {}, time.monotonic() + args.timeout
        while any(p.poll() is None for *_, p in processes) and time.monotonic() < deadline:
            for ns, _, _, process in processes:
                if (counters := read_counters(process.pid, ns)) is not None:
                    sent[ns] = counters[0]
            time.sleep(0.5)
        problems = "" if time.monotonic() < deadline else f"stopped after {args.timeout} s"
        for *_, log, process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            log.close()
    logs = [(folder / name / f"{ns}.log").read_text(errors="replace") for ns in bridge.names]
    losses = [float(m.group(1)) for text in logs
              if (m := re.search(r"fixed-seed eval loss: [\d.]+ at the start, ([\d.]+) at the end", text))]
    per_step = re.search(r"sends about ([\d.]+) MB from each peer with 3 peers", logs[0])
    steps = max(int(m) for m in re.findall(r'"local_epoch": (\d+)', (processes[0][1] / "metrics.jsonl").read_text()))
    return Result(name, sum(losses) / max(len(losses), 1) if losses else float("nan"),
                  sum(sent.values()) / max(len(sent), 1) / 1e6, time.time() - began, steps,
                  float(per_step.group(1)) * steps if per_step else float("nan"),
                  problems + ("" if len(losses) == 3 else f" {len(losses)}/3 peers printed an eval loss"))


def download_figures() -> list[str]:
    from sdswarm.config import SwarmConfig
    from sdswarm.model.loading import TINY_MODEL_ID, load_components
    from sdswarm.swarm.costs import NetworkCosts
    from sdswarm.swarm.optimizer import COMPRESSIONS, compression_name, state_compression

    tiny = load_components(TINY_MODEL_ID)
    params = [*tiny.unet.parameters(), *tiny.text_encoder.parameters()]  # configs/tiny.yaml trains both
    lines = []
    for sync in ("every_step", "local_steps"):
        swarm = SwarmConfig(sync=sync)
        name = compression_name(swarm)
        costs = NetworkCosts.of(params, swarm, name, COMPRESSIONS[name](), state_compression())
        lines.append(f"  {sync}: a late joiner downloads {costs.download_bytes / costs.num_params:.2f} bytes per "
                     f"parameter (was 12: fp32 weights and AdamW moments)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=200, help="batches each peer trains (equal samples)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cap", default="20mbit", help="tbf rate on each direction of each peer's link")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: network namespaces, veth, tc")
    sys.path.insert(0, str(ROOT / "src"))
    folder = Path(tempfile.mkdtemp(prefix="sdswarm-diloco-bench-"))
    from sdswarm.model.loading import TINY_MODEL_ID, default_cache_dir, load_components

    args.cache = str(default_cache_dir())  # the built tiny model, shared with the peers

    load_components(TINY_MODEL_ID)  # built once, before the peers start
    results = []
    for name in args.variants.split(","):
        print(f"{name}: 3 peers x {args.steps} steps x batch {args.batch} at {args.cap} ...", flush=True)
        results.append(run_variant(name, args, folder))
        print(f"  {results[-1]}", flush=True)
    base = next((r for r in results if r.variant == "fp16"), results[0])
    print(f"\n3 peers, {args.steps} steps x batch {args.batch} each, {args.cap} each way per peer; logs in {folder}")
    print(f"{'variant':<12} {'eval loss':>9} {'vs fp16':>8} {'sent/peer':>10} {'vs fp16':>8} {'wall':>7} "
          f"{'swarm steps':>11} {'estimate':>9} {'est/meas':>8}")
    for r in results:
        print(f"{r.variant:<12} {r.eval_loss:>9.4f} {r.eval_loss / base.eval_loss:>8.3f} {r.sent_mb:>8.1f}MB "
              f"{r.sent_mb / base.sent_mb:>8.4f} {r.wall:>6.0f}s {r.swarm_steps:>11} {r.estimate_mb:>7.1f}MB "
              f"{r.estimate_mb / r.sent_mb if r.sent_mb else float('nan'):>8.2f} {r.problems}")
    print("\n".join(["late joiner's download (UNet + text encoder of the tiny model):", *download_figures()]))


if __name__ == "__main__":
    main()
