"""What a LoRA swarm of Stable Diffusion 1.5 sends, downloads and stores, against a full fine-tune (not a test).

    .venv/bin/python bench/lora_sizes.py                       # sizes: SD 1.5 on the meta device, seconds
    .venv/bin/python bench/lora_sizes.py --wire-ratio 1.52     # with the ratio swarm_traffic.py measured
    .venv/bin/python bench/lora_sizes.py --memory FOLDER       # + the how-to's config in LoRA mode at real size

Sizes: SD 1.5's real UNet2DConditionModel and CLIPTextModel (its configs, built on the meta device: no memory, no
download) with sdswarm's adapters (configs/sd_1-5-lora.yaml: kohya's targets, UNet + text encoder) for rank 8, 32
and 128, against the full model. Per trainable parameter:
  - each swarm step a peer sends `--wire-ratio` x its fp32 size: what bench/swarm_traffic.py measures on the veth
    between two real peers (fp16 compression, average_state_every 1: gradients + parameters, about 1.5x; run it with
    --set "train.lora={rank: 4}" for the ratio in LoRA mode);
  - a late joiner downloads 12 bytes (parameters and AdamW's two moments, uncompressed);
  - a checkpoint holds the fp32 adapters (4 bytes: the exported file) and AdamW's moments (8), 12 bytes; a full
    fine-tune's holds the whole pipeline (+ the VAE).

--memory: the how-to's config in LoRA mode (configs/sd_1-5-lora.yaml) on a local diffusers folder with SD 1.5's
architecture and random weights (built into FOLDER once, 4.3 GB), at 256 px on the CPU, batch 1, until its first
swarm step and a checkpoint; prints the peak memory (the node's own peak resident set, and the peak proportional
set size of its whole process tree: hivemind's DHT and averagers are forks sharing pages) and the time per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANKS = (8, 32, 128)
LINKS_MBIT = (20, 100)
# SD 1.5 (runwayml/stable-diffusion-v1-5): the UNet's and text encoder's configs; the VAE's for --memory
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}  # the rest: diffusers' defaults
SD15_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "projection_dim": 768}
SD15_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "sample_size": 512}


def sd15_parts(device: str = "meta"):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return UNet2DConditionModel(**SD15_UNET), CLIPTextModel(CLIPTextConfig(**SD15_TEXT))


def count_sizes() -> tuple[dict[str, list], object]:
    """The trainable tensors of SD 1.5 (UNet + text encoder, on the meta device) for each rank and for the full
    fine-tune; and the LoRA config's swarm settings."""
    from sdswarm.config import load_config

    config = load_config(ROOT / "configs" / "sd_1-5-lora.yaml")
    unet, text = sd15_parts()
    sizes = {"full": [p for m in (unet, text) for p in m.parameters()]}
    for rank in RANKS:
        sizes[f"LoRA rank {rank}"] = sd15_adapters(rank)
    return sizes, config.swarm


def sd15_adapters(rank: int) -> list:
    """The trainable tensors of a LoRA swarm of SD 1.5 (configs/sd_1-5-lora.yaml's targets, UNet + text encoder) at
    this rank, on the meta device."""
    from sdswarm.config import LoraConfig, load_config
    from sdswarm.model.loading import SDComponents
    from sdswarm.model.lora import add_adapters

    config = load_config(ROOT / "configs" / "sd_1-5-lora.yaml")
    unet, text = sd15_parts()
    components = SDComponents(unet=unet, vae=None, text_encoder=text, tokenizer=None, noise_scheduler=None)
    settings = LoraConfig(**{**config.train.lora.model_dump(), "rank": rank, "alpha": None})
    return add_adapters(components, settings, text_encoder=True, seed=0)


def lora_checkpoint_bytes(shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """(adapter file, training state) bytes of a LoRA checkpoint with adapters of these shapes, written as
    train/checkpoint.py writes them: the adapters in fp16 (safetensors), the training state compact
    (train/compact_state.py: AdamW's moments in blockwise fp8) with torch.save. Random values: the sizes do not
    depend on them."""
    import torch
    from safetensors.torch import save_file

    from sdswarm.train.compact_state import compact

    adapters = {f"adapter.{i}.weight": torch.randn(shape).half() for i, shape in enumerate(shapes)}
    moments = {i: {"step": torch.tensor(100.0), "exp_avg": torch.randn(shape) * 1e-4,
                   "exp_avg_sq": torch.rand(shape) * 1e-8} for i, shape in enumerate(shapes)}
    state = {"progress": {"step": 100}, "optimizer": {"state": moments, "param_groups": [{"params": list(moments)}]},
             "scaler": {}, "ema": None, "rng": {"noise": torch.zeros(5056, dtype=torch.uint8)}}
    with tempfile.TemporaryDirectory(prefix="sdswarm-lora-size-") as folder:
        save_file(adapters, f"{folder}/adapters.safetensors")
        torch.save(compact(state), f"{folder}/training_state.pt")
        return (os.path.getsize(f"{folder}/adapters.safetensors"), os.path.getsize(f"{folder}/training_state.pt"))


def report_sizes(sizes: dict[str, list], swarm, wire_ratio: float | None) -> str:
    """The table: per trainable parameter, what a swarm step sends (2 peers), what a late joiner downloads and what a
    checkpoint holds, and the time each takes on a home link."""
    from sdswarm.swarm.costs import NetworkCosts
    from sdswarm.swarm.optimizer import COMPRESSIONS, compression_name, state_compression

    codec = compression_name(swarm)
    counts = {name: sum(p.numel() for p in params) for name, params in sizes.items()}
    costs = {name: NetworkCosts.of(params, swarm, codec, COMPRESSIONS[codec](), state_compression())
             for name, params in sizes.items()}
    full, r32 = counts["full"], counts["LoRA rank 32"]
    computed = costs["LoRA rank 32"].step_bytes(2) / (4 * r32)
    ratio = computed if wire_ratio is None else wire_ratio
    adapter_file, state_file = lora_checkpoint_bytes([tuple(p.shape) for p in sizes["LoRA rank 32"]])
    per_param = (adapter_file + state_file) / r32  # measured at rank 32, for every rank
    lines = [f"SD 1.5 UNet + text encoder (configs/sd_1-5-lora.yaml: swarm.sync {swarm.sync}, {codec}, "
             f"average_state_every {swarm.average_state_every})",
             f"per swarm step a peer of 2 sends {ratio:.3f} x the fp32 trainables ("
             + ("computed by swarm/costs.py" if wire_ratio is None else
                f"measured with bench/swarm_traffic.py; swarm/costs.py computes {computed:.3f}")
             + "; a large swarm: up to 2x that)",
             "late joiner: the state download swarm/costs.py computes (weights fp16, AdamW's moments 8-bit); "
             f"checkpoint: LoRA {per_param:.2f} bytes per adapter parameter (written at rank 32: fp16 adapters "
             f"{mb(adapter_file)}, training state {mb(state_file)}); full: the fp32 pipeline + AdamW's fp32 moments",
             f"{'':<14} {'trainable':>13} {'vs full':>8} {'per step':>10} {'join':>10} {'checkpoint':>11}   "
             + "   ".join(f"{'step / join @' + str(m) + ' Mbit/s':>24}" for m in LINKS_MBIT)]
    for name, count in counts.items():
        step, join = ratio * 4 * count, costs[name].download_bytes
        checkpoint = per_param * count if name != "full" else 12 * count + 4 * 83_653_863  # + the VAE in the pipeline
        times = "   ".join(f"{duration(step, m):>11} / {duration(join, m):>10}" for m in LINKS_MBIT)
        lines.append(f"{name:<14} {count:>13,} {count / full:>7.2%} {mb(step):>10} {mb(join):>10} "
                     f"{mb(checkpoint):>11}   {times}")
    lines.append(f"\nrank 32: per-step traffic 1/{full / r32:.0f} of the full fine-tune's (goal <= 1/40), state "
                 f"download {mb(costs['LoRA rank 32'].download_bytes)} (goal <= 250 MB), checkpoint "
                 f"{mb(per_param * r32)} (goal <= 100 MB; it was {mb(12 * r32)} with fp32 adapters and moments)")
    return "\n".join(lines)


def mb(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def duration(size: float, mbit: float) -> str:
    seconds = size * 8 / (mbit * 1e6)
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.1f} s"


# --- real-size memory ---------------------------------------------------------------------------------------------


def build_sd15_folder(folder: Path) -> Path:
    """SD 1.5's architecture with random weights as a diffusers folder (the tiny model's tokenizer files: its ids
    fit SD's vocabulary); built once, atomically."""
    if (folder / "model_index.json").exists():
        return folder
    import shutil

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    from sdswarm.model.tiny import TOKENIZER_ASSETS, tiny_tokenizer

    torch.manual_seed(0)
    unet, text = sd15_parts("cpu")
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    pipeline = StableDiffusionPipeline(vae=AutoencoderKL(**SD15_VAE), text_encoder=text, tokenizer=tiny_tokenizer(),
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_ASSETS / name, tmp / "tokenizer" / name)
    os.rename(tmp, folder)
    return folder


def tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def kb_field(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_memory(folder: Path, steps: int, timeout: float, config: str = "configs/sd_1-5-lora.yaml",
               sets: dict[str, object] | None = None, timeline: Path | None = None) -> dict:
    """The node on `config` at real size until `steps` steps and a checkpoint; prints and returns the figures.
    `timeline`: a CSV of the memory every 0.5 s (seconds, the node's resident set, its process tree's PSS)."""
    build_started = time.perf_counter()
    build_sd15_folder(folder)
    print(f"SD 1.5 folder ready in {time.perf_counter() - build_started:.0f} s: {folder}", flush=True)
    from sdswarm.data.demo import make_demo_dataset
    from sdswarm.swarm.settings import NodeSettings, save_settings

    label = " ".join(f"--set {k}={v}" for k, v in (sets or {}).items())
    with tempfile.TemporaryDirectory(prefix="sdswarm-real-mem-") as out:
        # loopback, ports the system picks: other nodes on this machine may hold the default ones
        save_settings(NodeSettings(mode="relay", listen_host="127.0.0.1", ie_port_internal=0, dht_port_internal=0),
                      Path(out))
        sets = {"model": str(folder), "resolution": 256, "train.batch_size": 1, "train.max_steps": steps,
                "swarm.target_batch_size": 2, "swarm.run_id": f"real-mem-{os.getpid()}", "swarm.matchmaking_time": 2,
                # the how-to's danbooru bucket is on the internet: the demo's posts, as a folder, stand in for it
                "data.source": str(make_demo_dataset(Path(out) / "posts")), "data.index": "null",
                "data.loader_workers": 0, "output.sample_steps": 1, "output.sample_prompts": '["1girl, solo"]',
                "output.log_every": 1, "output.checkpoint_every": 1000, **(sets or {})}
        command = [sys.executable, "-m", "sdswarm", "mother", config, "--output", out,
                   *[f"--set={k}={v}" for k, v in sets.items()]]
        log_path = Path(out) / "node.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        started, peak_hwm, peak_pss, samples = time.perf_counter(), 0, 0, []
        try:
            while process.poll() is None:
                if time.perf_counter() - started > timeout:
                    raise TimeoutError(f"the node did not finish in {timeout:.0f} s")
                rss = kb_field(Path(f"/proc/{process.pid}/status"), "VmRSS")
                peak_hwm = max(peak_hwm, kb_field(Path(f"/proc/{process.pid}/status"), "VmHWM"))
                tree_pss = sum(kb_field(Path(f"/proc/{p}/smaps_rollup"), "Pss") for p in tree(process.pid))
                peak_pss = max(peak_pss, tree_pss)
                samples.append(f"{time.perf_counter() - started:.1f},{rss},{tree_pss}")
                time.sleep(0.5)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, 9)
            if timeline is not None:
                timeline.write_text("seconds,node_rss_bytes,tree_pss_bytes\n" + "\n".join(samples) + "\n")
        wall = time.perf_counter() - started
        text = log_path.read_text(errors="replace")
        result = {"peak_hwm": peak_hwm, "peak_pss": peak_pss, "returncode": process.returncode, "wall": wall}
        print(f"\n{config} {label}: SD 1.5 architecture, random weights, 256 px, batch 1, CPU")
        for line in text.splitlines():
            if "training: LoRA" in line or "training: full" in line or "hashed in" in line or "does not fit" in line:
                print("  " + line.split(": ", 1)[-1])
        print(f"  peak memory: the node {peak_hwm / 1e9:.2f} GB resident (VmHWM); its process tree "
              f"{peak_pss / 1e9:.2f} GB (peak sum of PSS)")
        if process.returncode != 0:
            print("  the node FAILED with", process.returncode, "(-9: killed, e.g. out of memory); log tail:")
            print("  " + "\n  ".join(text.splitlines()[-15:]))
            return result
        metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
                   if '"step"' in line]
        times = [b["time"] - a["time"] for a, b in zip(metrics, metrics[1:], strict=False)]
        checkpoints = sorted((Path(out) / "checkpoints").iterdir())
        size = sum(f.stat().st_size for f in checkpoints[-1].rglob("*") if f.is_file())
        swarm_steps = max(m.get("local_epoch", 0) for m in metrics)
        result.update(swarm_steps=swarm_steps, checkpoint=checkpoints[-1].name, checkpoint_bytes=size, times=times)
        print(f"  {len(metrics)} steps, {swarm_steps} swarm step(s), checkpoint {checkpoints[-1].name}: {mb(size)}")
        if times:
            print(f"  time per step: {statistics.median(times):.1f} s median of steps 2..{len(metrics)} "
                  f"({', '.join(f'{t:.1f}' for t in times)}); whole run {wall:.0f} s")
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wire-ratio", type=float,
                        help="bytes a peer sends per swarm step / fp32 bytes of the trainables, as "
                             "bench/swarm_traffic.py measures it (default: what swarm/costs.py computes)")
    parser.add_argument("--memory", type=Path, metavar="FOLDER", help="also run the real-size memory check; the SD "
                        "1.5-shaped model is built into FOLDER once (4.3 GB)")
    parser.add_argument("--steps", type=int, default=4, help="--memory: local steps (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=3000.0, help="--memory: seconds (default: %(default)s)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    print(report_sizes(*count_sizes(), args.wire_ratio), flush=True)
    if args.memory:
        result = run_memory(args.memory.resolve(), args.steps, args.timeout)
        print(f"  goal: peak <= 8 GB ({'met' if max(result['peak_hwm'], result['peak_pss']) <= 8e9 else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
