"""Checkpoints: a diffusers pipeline folder plus the training state, written atomically in the background, pruned,
resumed.

Layout of one checkpoint (`OUTPUT/checkpoints/step_00001000/`):
    model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   StableDiffusionPipeline.from_pretrained
    training_state.pt   optimizer, scaler, EMA, counters, RNG (torch.save, loads with weights_only=True)
    checkpoint.json     the step and what was trained: read without opening training_state.pt
    config.yaml         the config the run was trained with
In LoRA mode (train.lora) the pipeline is replaced by the adapters and the base model's identity (model/lora.py):
    pytorch_lora_weights.safetensors, base_model.json   StableDiffusionPipeline.load_lora_weights loads the first
and the checkpoint is about 4 bytes per adapter parameter instead of 12 (SD 1.5 rank 32: 76 MB, not 227 MB): the
adapters in fp16 (2 bytes) and the training state compact (train/compact_state.py: AdamW's moments in blockwise fp8,
1 byte each). A resume is then as exact as a late joiner's download (fp16 weights, 8-bit moments): the adapters move
by at most half an fp16 step (2^-11 of their value, a fraction of one update at the usual lr) once per resume.

The folder loads in the tools users have: the text encoder's keys carry the `text_model.` prefix (transformers 5
writes them without it, which transformers 4 cannot read), the tokenizer has vocab.json + merges.txt beside
tokenizer.json (transformers 4's CLIPTokenizer reads those).

Training is blocked only while the trained weights and the training state are copied to CPU memory; a writer
thread writes the copy (one write in flight: the next checkpoint waits for it). Parts that never change in a run
(the VAE, tokenizer, scheduler, and the text encoder when it is not trained) are written once per process and
hard-linked into later checkpoints, so each folder still loads on its own and deleting one never breaks another.
A checkpoint is built in a hidden temp folder and renamed into place (sdswarm.atomic), so a crash leaves
either the whole checkpoint or none; temp folders left by a killed process are removed on the next start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from sdswarm.atomic import TEMP_NAME, atomic_path
from sdswarm.model.loading import SDComponents
from sdswarm.model.lora import BaseIdentity, save_adapters
from sdswarm.train.compact_state import compact, expand

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
INFO_FILE = "checkpoint.json"
TEXT_PREFIX = "text_model."  # how transformers 4 (and SD 1.x hub folders) name the CLIP text encoder's keys
CHECKPOINT_NAME = re.compile(r"^step_(\d{8,})$")


def as_pipeline(components: SDComponents, scheduler=None) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler or components.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@dataclass
class _Snapshot:
    """What one checkpoint writes, copied so that training can go on while it is written."""

    step: int
    components: SDComponents  # configs, and the frozen parts' weights (never changed in a run)
    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor] | None  # None: frozen, written from the module itself
    training_state: dict[str, Any]


class Checkpoints:
    """The checkpoints of one run, in `root`, newest `keep` kept; each holds `config_yaml`, the run's config.
    `train_text_encoder`: whether the text encoder changes during the run (else it is written once per process
    and hard-linked like the VAE)."""

    def __init__(self, root: Path, keep: int, config_yaml: str = "", *, train_text_encoder: bool = True) -> None:
        self.root, self.keep, self.config_yaml = Path(root), keep, config_yaml
        self.train_text_encoder = train_text_encoder
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in (p for p in self.root.iterdir() if TEMP_NAME.match(p.name)):
            log.warning("removing incomplete checkpoint %s (left by an interrupted save)", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._in_flight: Future[Path] | None = None
        self._frozen_from: Path | None = None  # the newest checkpoint this process wrote: later ones link to it

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = [p for p in self.root.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, components: SDComponents, training_state: dict[str, Any], *,
             lora_base: BaseIdentity | None = None, wait: bool = False) -> Path:
        """Copy what changes to CPU memory, then write it in the background (after the write in flight, if any).

        Returns the checkpoint's final path; it exists once `wait()` returns. wait=True: return when written.
        `lora_base`: a LoRA run's base model: only the adapters (megabytes) are written, with its identity, at once."""
        self.wait()  # one write in flight: never two copies of the state in memory, never two writers
        if lora_base is not None:
            return self._write_adapters(step, components, training_state, lora_base)
        snapshot = _Snapshot(
            step=step,
            components=components,
            unet=cpu_copy(components.unet.state_dict()),
            text_encoder=cpu_copy(components.text_encoder.state_dict()) if self.train_text_encoder else None,
            training_state=cpu_copy(training_state),
        )
        self._in_flight = self._writer.submit(self._write, snapshot)
        final = self.root / f"step_{step:08d}"
        if wait:
            self.wait()
        return final

    def wait(self) -> Path | None:
        """Block until the write in flight is done; raise its error if it failed. None when nothing was in flight."""
        in_flight, self._in_flight = self._in_flight, None
        return in_flight.result() if in_flight is not None else None

    def close(self) -> None:
        """Finish the write in flight and stop the writer thread."""
        try:
            self.wait()
        finally:
            self._writer.shutdown(wait=True)

    def _write_adapters(self, step: int, components: SDComponents, training_state: dict[str, Any],
                        lora_base: BaseIdentity) -> Path:
        final = self.root / f"step_{step:08d}"
        with atomic_path(final, durable=True) as tmp:
            save_adapters(components, tmp, lora_base, dtype=torch.float16)
            (tmp / CONFIG_FILE).write_text(self.config_yaml, encoding="utf-8")
            info = {"step": step, "lora": True, "ema": training_state.get("ema") is not None}
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            torch.save(compact(training_state), tmp / STATE_FILE)  # last: it marks a complete checkpoint
        self.prune()
        log.info("saved checkpoint %s", final)
        return final

    def _write(self, snapshot: _Snapshot) -> Path:
        final = self.root / f"step_{snapshot.step:08d}"
        try:
            # durable: a power cut must not publish empty files; the same step saved twice (periodic, then on
            # stop): the newer one wins
            with atomic_path(final, durable=True) as tmp:
                tmp.mkdir()
                c = snapshot.components
                as_pipeline(c).save_config(tmp)  # model_index.json
                c.unet.save_config(tmp / "unet")
                save_file(snapshot.unet, tmp / "unet" / "diffusion_pytorch_model.safetensors",
                          metadata={"format": "pt"})
                frozen = ["vae", "tokenizer", "scheduler"]
                if snapshot.text_encoder is not None:
                    write_text_encoder(c.text_encoder.config, snapshot.text_encoder, tmp / "text_encoder")
                else:
                    frozen.append("text_encoder")
                for part in frozen:
                    if not self._link_part(part, tmp):
                        write_frozen_part(c, part, tmp / part)
                (tmp / CONFIG_FILE).write_text(self.config_yaml, encoding="utf-8")
                info = {"step": snapshot.step, "train_text_encoder": snapshot.text_encoder is not None,
                        "ema": snapshot.training_state.get("ema") is not None}
                (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
                torch.save(snapshot.training_state, tmp / STATE_FILE)  # last: it marks a complete checkpoint
        except BaseException:
            log.exception("checkpoint %s could not be written", final)
            raise
        self._frozen_from = final
        self.prune()
        log.info("saved checkpoint %s", final)
        return final

    def _link_part(self, part: str, tmp: Path) -> bool:
        """Hard-link `part` (a subfolder) from the last checkpoint this process wrote; False if there is none."""
        source = self._frozen_from / part if self._frozen_from is not None else None
        if source is None or not source.is_dir():
            return False
        (tmp / part).mkdir()
        for file in source.iterdir():
            try:
                os.link(file, tmp / part / file.name)
            except OSError:  # a file system without hard links: a copy is still correct
                shutil.copy2(file, tmp / part / file.name)
        return True

    def prune(self) -> None:
        for old in self.all()[: -self.keep]:
            log.info("pruning old checkpoint %s (keep_checkpoints=%d)", old, self.keep)
            shutil.rmtree(old, ignore_errors=True)


def cpu_copy(value: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor copied to CPU (never a view of the live tensor)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True).contiguous()
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        copied = [cpu_copy(v) for v in value]
        return copied if isinstance(value, list) else tuple(copied)
    return value


def write_text_encoder(config, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """A CLIP text encoder folder both transformers 4 and 5 read: keys under `text_model.` (5 accepts them)."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tensors = {k if k.startswith(TEXT_PREFIX) else TEXT_PREFIX + k: v for k, v in state_dict.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def write_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.json (transformers 5 writes only that) plus the BPE files transformers 4's CLIPTokenizer reads."""
    tokenizer.save_pretrained(folder)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        return  # not a CLIP BPE tokenizer: nothing more to add
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def write_frozen_part(components: SDComponents, part: str, folder: Path) -> None:
    """One of the parts a run never changes, written from the module itself."""
    if part == "vae":
        components.vae.save_pretrained(folder, safe_serialization=True)
    elif part == "tokenizer":
        write_tokenizer(components.tokenizer, folder)
    elif part == "scheduler":
        components.noise_scheduler.save_pretrained(folder)
    elif part == "text_encoder":
        write_text_encoder(components.text_encoder.config, cpu_copy(components.text_encoder.state_dict()), folder)
    else:
        raise ValueError(f"unknown pipeline part {part!r}")


def checkpoint_step(checkpoint: Path) -> int | None:
    """The step a checkpoint was saved at, from checkpoint.json (older checkpoints: from the folder name)."""
    checkpoint = Path(checkpoint)
    try:
        return int(json.loads((checkpoint / INFO_FILE).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        match = CHECKPOINT_NAME.match(checkpoint.name)
        return int(match.group(1)) if match else None


def load_training_state(checkpoint: Path, *, mmap: bool = False) -> dict[str, Any]:
    """The training state (a LoRA checkpoint's compact moments expanded); mmap=True maps the file instead of reading
    it (only the tensors used are read)."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint: {STATE_FILE} is missing")
    return expand(torch.load(path, map_location="cpu", weights_only=True, mmap=mmap))
