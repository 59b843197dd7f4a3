"""Resident memory of a peer by role, in bytes per trainable parameter, for both swarm modes (not a test).

    .venv/bin/python bench/memory.py                      # 50 M parameters, about 4 GB at the peak
    .venv/bin/python bench/memory.py --params 200e6       # closer to real size (about 6 GB per process)
    .venv/bin/python bench/memory.py --real FOLDER        # + the how-to's full fine-tune at real size, both modes

For each mode (`every_step`, `local_steps`) and each layout (hivemind's stock one, as a GPU peer has it, and the
in-place one a CPU-only peer uses: swarm/optimizer.py's InPlaceOptimizer, DiLoCo's pseudo-gradients in .grad),
two real peers on 127.0.0.1 run sdswarm's make_optimizer over PARAMS float32 parameters (no model: what the
optimizer holds, per parameter). The donor trains alone (gradients accumulated into .grad as autograd does, the
trainer's zero_grad after each step) until its first swarm step: the *training* role; then a joiner downloads its
state: the donor's peak meanwhile is the *serving* role, the joiner's the *downloading* role. Each figure is the
peak of the process tree's proportional set size (hivemind's averagers are forks sharing its pages) minus what the
same process held before it made the parameters, divided by PARAMS.

From the figures: the projection for the how-to's volunteer (a 24 GB GPU, 32 GB of RAM) training SD 1.5's UNet +
text encoder (983 M parameters): a GPU peer has hivemind's stock layout, with parameter, .grad and (every_step) the
accumulator on the GPU (12 or 8 bytes per parameter) and the rest in host memory.

--real FOLDER: the how-to's full fine-tune (configs/sd_1-5.yaml, --set train_text_encoder=False: SD 1.5's UNet,
860 M trainable parameters) on a local folder with SD 1.5's architecture and random weights (bench/lora_sizes.py
builds it), 256 px, batch 1, on the CPU, in each mode until its first swarm step and a checkpoint (DiLoCo with
local_steps 2): the peak memory, the memory over time (a CSV per mode), the time per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lora_sizes import kb_field, tree  # bench/ is this script's folder: the process-tree helpers

ROOT = Path(__file__).resolve().parent.parent
HOWTO_TRAINABLE = 859_520_964 + 123_060_480  # SD 1.5's UNet + text encoder (field notes §6)
TENSORS = 64  # the parameters in this many tensors (SD 1.5's UNet: 686, the largest 13 M)
GPU_BYTES = {"every_step": 12, "local_steps": 8}  # hivemind's device-side layout: weights, .grad (+ accumulator)


# --- measuring ----------------------------------------------------------------------------------------------------


def pss(pid: int) -> int:
    """Proportional set size of pid and its descendants, bytes."""
    return sum(kb_field(Path(f"/proc/{member}/smaps_rollup"), "Pss") for member in tree(pid))


class Sampler:
    """This process tree's memory every 0.2 s, the peak kept per phase."""

    def __init__(self) -> None:
        self.phase, self.peaks, self.baseline = "start", {}, 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            value = pss(os.getpid())
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value)
            time.sleep(0.2)

    def enter(self, phase: str) -> None:
        time.sleep(0.5)  # a sample of the phase before
        self.phase = phase


# --- one peer (a subprocess) ----------------------------------------------------------------------------------------


def peer(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import hivemind
    import torch

    from sdswarm.config import SwarmConfig
    from sdswarm.swarm.optimizer import make_optimizer

    sampler = Sampler()
    workdir = Path(args.workdir)
    initial = json.loads((workdir / "donor.json").read_text())["maddrs"] if args.role == "joiner" else []
    dht = hivemind.DHT(start=True, initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    if args.role == "donor":
        (workdir / "donor.json").write_text(json.dumps({"maddrs": [str(a) for a in dht.get_visible_maddrs()]}))
    time.sleep(1)
    baseline = pss(os.getpid())
    sampler.enter("build")
    torch.manual_seed(0 if args.role == "donor" else 1)
    size = int(args.params) // TENSORS
    params = [torch.nn.Parameter(torch.randn(size) * 0.02) for _ in range(TENSORS)]
    swarm = SwarmConfig(run_id=args.run_id, sync=args.sync, local_steps=2, target_batch_size=2, matchmaking_time=2.0,
                        averaging_timeout=60.0, allreduce_timeout=60.0, load_state_timeout=600.0)
    optimizer = make_optimizer(dht=dht, params=params, swarm=swarm, batch_size_per_step=1, lr=1e-4,
                               betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, max_grad_norm=1.0,
                               in_place=args.layout == "in_place", verbose=False)
    result = {"baseline": baseline}
    if args.role == "donor":
        sampler.enter("training")
        while optimizer.local_epoch < 1:
            with torch.no_grad():
                for param in params:  # what autograd does: a new .grad, or summed into the one there
                    grad = torch.randn_like(param) * 1e-3
                    if param.grad is None:
                        param.grad = grad
                    else:
                        param.grad += grad
                    del grad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sampler.enter("serving")
        (workdir / "trained").touch()
        deadline = time.monotonic() + 900
        while not (workdir / "downloaded").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    else:
        while not (workdir / "trained").exists():
            time.sleep(0.2)
        sampler.enter("downloading")
        optimizer.load_state_from_peers()
        result["downloaded"] = optimizer.local_epoch >= 1  # the donor's state is at its first swarm step
        (workdir / "downloaded").touch()
    sampler.enter("end")
    result["peaks"] = sampler.peaks
    (workdir / f"{args.role}.result.json").write_text(json.dumps(result))
    os._exit(0)  # hivemind's processes go with the process group (run_pair)


def run_pair(sync: str, layout: str, params: float) -> dict[str, float]:
    """The roles' peaks for one mode and layout, bytes per parameter."""
    with tempfile.TemporaryDirectory(prefix="sdswarm-memory-") as workdir:
        common = [sys.executable, __file__, "--peer", "--workdir", workdir, "--sync", sync, "--layout", layout,
                  "--params", str(params), "--run-id", f"mem-{sync}-{layout}-{os.getpid()}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        donor = subprocess.Popen([*common, "--role", "donor"], env=env, start_new_session=True)
        while not (Path(workdir) / "donor.json").exists():
            if donor.poll() is not None:
                raise SystemExit(f"the donor failed ({sync}, {layout})")
            time.sleep(0.2)
        joiner = subprocess.Popen([*common, "--role", "joiner"], env=env, start_new_session=True)
        for process in (donor, joiner):
            try:
                process.wait(timeout=1800)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, 9)
        results = {role: json.loads((Path(workdir) / f"{role}.result.json").read_text())
                   for role in ("donor", "joiner")}
    per = {"training": ("donor", "training"), "serving": ("donor", "serving"),
           "downloading": ("joiner", "downloading")}
    if not results["joiner"].get("downloaded"):
        print(f"  {sync} {layout}: the joiner's download FAILED: its figure is not a download's", flush=True)
    return {name: (results[role]["peaks"][phase] - results[role]["baseline"]) / params
            for name, (role, phase) in per.items()}


def run_real(folder: Path, timeline_dir: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT / "src"))
    from lora_sizes import run_memory

    unet = 859_520_964
    for sync in ("every_step", "local_steps"):
        timeline = timeline_dir / f"sdswarm-memory-{sync}.csv"
        result = run_memory(folder, steps=2, timeout=2400, config="configs/sd_1-5.yaml", timeline=timeline,
                            sets={"train_text_encoder": False, "swarm.sync": sync, "swarm.local_steps": 2})
        peak = max(result["peak_hwm"], result["peak_pss"])
        reached = result.get("swarm_steps", 0) >= 1 and "checkpoint" in result
        print(f"  {sync}: peak {peak / 1e9:.2f} GB = {peak / unet:.1f} bytes per trainable parameter (all included); "
              f"first swarm step and checkpoint: {'reached' if reached else 'NOT reached'}; memory over time: "
              f"{timeline}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=50e6, help="trainable parameters (default: %(default)g)")
    parser.add_argument("--real", type=Path, metavar="FOLDER", help="also the how-to's full fine-tune at real size")
    parser.add_argument("--real-only", action="store_true", help="--real without the per-role figures")
    parser.add_argument("--timeline-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="--real: where the memory-over-time CSVs go (default: %(default)s)")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=("donor", "joiner"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--sync", default="every_step", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="in_place", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        peer(args)
        return 0
    if args.real:
        run_real(args.real.resolve(), args.timeline_dir)
        if args.real_only:
            return 0
    rows = {}
    for sync in ("every_step", "local_steps"):
        for layout in ("stock", "in_place"):
            rows[sync, layout] = run_pair(sync, layout, args.params)
            print(f"  measured {sync} {layout}", flush=True)
    print(f"\npeak resident memory per trainable parameter (bytes; {args.params / 1e6:.0f} M float32 parameters, "
          "PSS of each peer's process tree above its start)")
    print(f"{'mode':<12} {'layout':<9} {'training':>9} {'serving':>8} {'downloading':>12}")
    for (sync, layout), row in rows.items():
        print(f"{sync:<12} {layout:<9} {row['training']:>9.1f} {row['serving']:>8.1f} {row['downloading']:>12.1f}")
    for sync in ("every_step", "local_steps"):
        stock, lean = rows[sync, "stock"], rows[sync, "in_place"]
        print(f"{sync}: in place / stock: " + ", ".join(f"{role} {lean[role] / stock[role]:.2f}x" for role in lean))
    print(f"\nprojection: a volunteer with a 24 GB GPU and 32 GB of RAM training UNet + text encoder "
          f"({HOWTO_TRAINABLE / 1e6:.0f} M parameters), hivemind's stock layout, before activations and the frozen VAE")
    for sync in ("every_step", "local_steps"):
        device = GPU_BYTES[sync] * HOWTO_TRAINABLE
        host = {role: (value - GPU_BYTES[sync]) * HOWTO_TRAINABLE for role, value in rows[sync, "stock"].items()}
        print(f"  {sync}: GPU {device / 1e9:.1f} GB; RAM " + ", ".join(
            f"{role} {value / 1e9:.1f} GB" for role, value in host.items())
            + f" (RAM left of 32 GB while downloading: {(32e9 - host['downloading']) / 1e9:.1f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
