"""How long a late joiner needs to download the swarm's state, against model size (not a test; prints figures).

    .venv/bin/python bench/state_download.py                  # 1M, 8M, 32M and 128M parameters: ~2 min
    .venv/bin/python bench/state_download.py --sizes 1,64     # millions of parameters

For each size, two processes on 127.0.0.1, each in its own process group: a holder and a joiner, both with the
same model (dense fp32 tensors) behind sdswarm's make_optimizer, as a node builds it. The joiner downloads the
training state as `sdswarm join` does when the swarm is under way: the parameters (fp16) and AdamW's two moments
(8-bit), about 4.2 bytes per parameter on the wire against 12 in fp32 (sdswarm skips hivemind's download of the
gradient buffers). Loopback has no bandwidth limit, so the figures are the cost of the state transfer itself
(compress, stream, check, decompress into place); on a real link add bytes / bandwidth, as the last lines do.
Compare the ratios of one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TENSOR = 1_000_000  # parameters per tensor: a model is a list of these
SD15 = {"UNet": 859_520_964, "UNet + text encoder": 859_520_964 + 123_060_480}


def build(millions: float, seed: int):
    import hivemind
    import torch

    from sdswarm.config import SwarmConfig
    from sdswarm.swarm.network import start_dht
    from sdswarm.swarm.optimizer import make_optimizer

    torch.manual_seed(seed)
    total = int(millions * 1e6)
    sizes = [TENSOR] * (total // TENSOR) + ([total % TENSOR] if total % TENSOR else [])
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]

    def optimizer(dht: hivemind.DHT) -> hivemind.Optimizer:
        swarm = SwarmConfig(run_id=f"state-{millions:g}m", target_batch_size=10**9, load_state_timeout=600)
        return make_optimizer(dht=dht, params=params, swarm=swarm, batch_size_per_step=1, lr=1e-4,
                              betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=None, verbose=False)

    return params, optimizer, start_dht


def hold(millions: float, maddr_file: Path) -> None:
    """Serve the state until killed."""
    _, optimizer, start_dht = build(millions, seed=0)
    dht = start_dht(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    opt = optimizer(dht)  # declares its state for download (kept referenced: its averagers live as long as it)
    from sdswarm.atomic import write_atomic

    write_atomic(maddr_file, json.dumps([str(a) for a in dht.get_visible_maddrs()]).encode())
    while opt.state_averager.is_alive():  # until the group is killed
        time.sleep(1.0)


def join(millions: float, maddr_file: Path) -> None:
    """Download the holder's state once; what it took goes to RESULT next to the maddr file."""
    params, optimizer, start_dht = build(millions, seed=1)
    dht = start_dht(initial_peers=json.loads(maddr_file.read_text()), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    opt = optimizer(dht)
    state_bytes = sum(p.numel() * p.element_size() for p in params) * 3  # parameters and AdamW's 2 moments
    start = time.perf_counter()
    opt.load_state_from_peers()
    seconds = time.perf_counter() - start
    result = {"params": sum(p.numel() for p in params), "bytes": state_bytes, "seconds": seconds,
              "wire": opt.download_bytes}
    maddr_file.with_suffix(".result").write_text(json.dumps(result))
    os._exit(0)  # its DHT and averagers go with its process group


def spawn(role: str, millions: float, maddr_file: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        command = [sys.executable, __file__, f"--{role}", str(millions), "--maddr-file", str(maddr_file)]
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=out, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def measure(millions: float, folder: Path, timeout: float) -> dict:
    maddr_file = folder / f"holder-{millions:g}.json"
    logs = {role: folder / f"{role}-{millions:g}.log" for role in ("hold", "join")}
    holder = spawn("hold", millions, maddr_file, logs["hold"])
    joiner = None
    try:
        deadline = time.monotonic() + timeout
        while not maddr_file.exists():
            if holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the holder did not come up:\n{logs['hold'].read_text()[-2000:]}")
            time.sleep(0.2)
        joiner = spawn("join", millions, maddr_file, logs["join"])
        joiner.wait(timeout=max(1.0, deadline - time.monotonic()))
        result = maddr_file.with_suffix(".result")
        if not result.exists():
            raise RuntimeError(f"the joiner left no result:\n{logs['join'].read_text()[-2000:]}")
        return json.loads(result.read_text())
    finally:
        for process in (joiner, holder):
            if process is not None:
                stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,8,32,128", help="millions of parameters (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per size (default: %(default)s)")
    parser.add_argument("--link-mbit", type=float, default=100.0, help="home link for the estimate (default: 100)")
    parser.add_argument("--hold", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--join", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--maddr-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold is not None:
        hold(args.hold, args.maddr_file)
        return 0
    if args.join is not None:
        join(args.join, args.maddr_file)
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="sdswarm-state-") as folder:
        for millions in [float(s) for s in args.sizes.split(",")]:
            result = measure(millions, Path(folder), args.timeout)
            rows.append(result)
            print(f"{millions:g}M parameters: {result['seconds']:.1f} s", file=sys.stderr, flush=True)
    base = rows[0]
    print("late joiner: the training state (parameters + AdamW's moments) from one peer on 127.0.0.1; state: its "
          "fp32 size, wire: what is sent")
    print(f"{'parameters':>12}  {'state':>9}  {'wire':>9}  {'seconds':>8}  {'MB/s':>7}  {'size ratio':>10}  "
          f"{'time ratio':>10}")
    for r in rows:
        print(f"{r['params']:>12,}  {r['bytes'] / 1e6:>7.0f}MB  {r['wire'] / 1e6:>7.0f}MB  {r['seconds']:>8.1f}  "
              f"{r['bytes'] / 1e6 / r['seconds']:>7.0f}  {r['params'] / base['params']:>9.1f}x  "
              f"{r['seconds'] / base['seconds']:>9.1f}x")
    rate = rows[-1]["wire"] / rows[-1]["seconds"]  # the largest model's rate: the least start-up overhead
    per_parameter = rows[-1]["wire"] / rows[-1]["params"]
    print(f"\nStable Diffusion 1.5, at {rate / 1e6:.0f} MB/s (this machine's loopback) or over a "
          f"{args.link_mbit:g} Mbit/s link:")
    for name, count in SD15.items():
        size = per_parameter * count
        print(f"  {name}: {count:,} parameters, state {size / 1e9:.1f} GB: {size / rate / 60:.1f} min here, "
              f"{size * 8 / (args.link_mbit * 1e6) / 60:.0f} min over the link")
    return 0


if __name__ == "__main__":
    sys.exit(main())
