"""What a checkpoint costs training, at SD 1.5's real size (its architecture, random weights; nothing downloaded):
the time training is blocked and the disk used by `keep` checkpoints, the old way (pipeline.save_pretrained +
torch.save of the state, synchronous, everything re-written) against train/checkpoint.py (copy, write in the
background, frozen parts hard-linked); and the memory `sdswarm export` needed to learn the step.

    flock /tmp/sdswarm-heavy.lock timeout 1800 .venv/bin/python bench/checkpoint_write.py --dir /tmp/ckpt-bench

The training state stands in for hivemind's (AdamW moments etc.) with `--state-fraction` x the UNet's size of
fp32 tensors (default 0.2, to stay under ~14 GB resident on a 24 GB machine: the background write holds a second
copy of the state and the UNet); the real one is about 2.3x (7.80 GB in the issue's measurement). Copy and write
times grow linearly with it. Timings on a shared machine are noisy: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdswarm.model.loading import SDComponents
from sdswarm.model.tiny import tiny_tokenizer
from sdswarm.train.checkpoint import STATE_FILE, Checkpoints, as_pipeline

GB = 1e9


def sd15_components() -> SDComponents:
    """SD 1.5's UNet, VAE and CLIP ViT-L text encoder configs, random weights (the tokenizer does not matter here)."""
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    return SDComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
                        noise_scheduler=scheduler)


def training_state(components: SDComponents, fraction: float, step: int) -> dict:
    params = list(components.unet.parameters())
    budget = fraction * sum(p.numel() for p in params)
    moments, used = {}, 0
    for index, p in enumerate(params):
        if used + p.numel() > budget:
            break
        moments[index] = torch.randn_like(p)
        used += p.numel()
    return {"progress": {"step": step}, "optimizer": {"state": moments}, "ema": None}


def disk_bytes(root: Path) -> int:
    """Bytes on disk under root, each hard-linked file counted once (as `du` does)."""
    seen, total = set(), 0
    for path in root.rglob("*"):
        if path.is_file():
            stat = path.stat()
            if stat.st_ino not in seen:
                seen.add(stat.st_ino)
                total += stat.st_size
    return total


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def old_save(root: Path, step: int, components: SDComponents, state: dict) -> float:
    """The previous Checkpoints.save: everything, synchronously."""
    started = time.perf_counter()
    tmp, final = root / f".tmp-step_{step:08d}", root / f"step_{step:08d}"
    as_pipeline(components).save_pretrained(tmp, safe_serialization=True)
    torch.save(state, tmp / STATE_FILE)
    fsync_tree(tmp)
    os.rename(tmp, final)
    return time.perf_counter() - started


def peak_rss_of(code: str) -> float:
    """Peak resident memory (GB) of a fresh Python running `code`."""
    script = code + "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    return int(out.strip().splitlines()[-1]) * 1024 / GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/sdswarm-checkpoint-bench"))
    parser.add_argument("--state-fraction", type=float, default=0.2)
    parser.add_argument("--keep", type=int, default=2)
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    process = psutil.Process()
    torch.manual_seed(0)
    components = sd15_components()
    state = training_state(components, args.state_fraction, 1)
    state_gb = sum(t.numel() * 4 for t in state["optimizer"]["state"].values()) / GB
    print(f"SD 1.5 architecture: UNet {sum(p.numel() for p in components.unet.parameters()):,} parameters; "
          f"training state {state_gb:.2f} GB; resident {process.memory_info().rss / GB:.1f} GB", flush=True)

    old_root = args.dir / "old"
    old_root.mkdir(parents=True)
    old_blocked = [old_save(old_root, step, components, state) for step in range(1, args.keep + 1)]
    old_disk = disk_bytes(old_root)
    print(f"old: blocked {old_blocked[0]:.1f} s, {old_blocked[1]:.1f} s per checkpoint; {args.keep} checkpoints "
          f"{old_disk / GB:.2f} GB on disk", flush=True)

    new_root = args.dir / "new"
    checkpoints = Checkpoints(new_root, keep=args.keep, train_text_encoder=True)  # as the how-to
    new_blocked, written = [], []
    peak = process.memory_info().rss
    for step in range(1, args.keep + 1):
        started = time.perf_counter()
        checkpoints.save(step, components, state)
        new_blocked.append(time.perf_counter() - started)
        peak = max(peak, process.memory_info().rss)
        checkpoints.wait()
        written.append(time.perf_counter() - started)
    new_disk = disk_bytes(new_root)
    print(f"new: blocked {new_blocked[0]:.1f} s, {new_blocked[1]:.1f} s per checkpoint (written in the background "
          f"in {written[0]:.1f} s, {written[1]:.1f} s); {args.keep} checkpoints {new_disk / GB:.2f} GB on disk; "
          f"resident during the write {peak / GB:.1f} GB", flush=True)
    print(f"ratios new/old: blocked {new_blocked[1] / old_blocked[1]:.2f}, disk {new_disk / old_disk:.2f}")

    last = new_root / f"step_{args.keep:08d}"
    full = peak_rss_of(f"import torch; torch.load({str(last / STATE_FILE)!r}, map_location='cpu', weights_only=True)")
    light = peak_rss_of(f"from sdswarm.train.checkpoint import checkpoint_step; checkpoint_step({str(last)!r})")
    mapped = peak_rss_of("from sdswarm.train.checkpoint import load_training_state; "
                         f"load_training_state({str(last)!r}, mmap=True)['progress']")
    print(f"reading the step for export: torch.load of the whole state peaks at {full:.2f} GB, checkpoint.json at "
          f"{light:.2f} GB, the memory-mapped state at {mapped:.2f} GB")
    print(json.dumps({"old_blocked_s": old_blocked, "new_blocked_s": new_blocked, "new_written_s": written,
                      "old_disk_gb": old_disk / GB, "new_disk_gb": new_disk / GB, "state_gb": state_gb}))
    checkpoints.close()
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
