"""A node as the web UI sees it (web.app.NodeAccess), without torch: a thread 'trains' a falling loss, writes
metrics, sample grids and, when asked, checkpoints in the layout the real trainer writes."""

from __future__ import annotations

import io
import json
import math
import os
import threading
import time
from pathlib import Path

from PIL import Image

from sdswarm.atomic import atomic_path
from sdswarm.config import ConfigError
from sdswarm.swarm.settings import NodeSettings, save_settings, update_settings

MODEL_FILES = {  # a checkpoint's files (the diffusers layout) with small stand-in contents
    "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
    "unet/config.json": b"{}",
    "unet/diffusion_pytorch_model.safetensors": os.urandom(64 * 1024),
    "vae/diffusion_pytorch_model.safetensors": os.urandom(16 * 1024),
    "tokenizer/vocab.json": b"{}",
}


class FakeNode:
    def __init__(self, output_dir: Path, *, tick: float = 0.2, leak: str = "", join_port: int = 8765) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.tick = tick
        self.leak = leak  # a secret the fake's log and status carelessly repeat: the UI must not
        self.join_port = join_port
        self.calls: list[str] = []
        self.records: list[dict] = []
        self.state = "training"
        self.step = 0
        self.control_error: Exception | None = None  # raised by the next control call, when set
        self.control_delay = 0.0
        self._settings = NodeSettings(mode="relay", listen_host="127.0.0.1", ie_port_internal=join_port)
        self._checkpoint_wanted = False
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._train, name="fake-trainer", daemon=True)

    # --- lifecycle of the fake ---
    def begin(self) -> FakeNode:
        self.write_sample(0)
        self._thread.start()
        return self

    def close(self) -> None:
        self._halt.set()
        self._thread.join(timeout=5)

    def _train(self) -> None:
        while not self._halt.wait(self.tick):
            with self._lock:
                if self.state != "training":
                    continue
                self.step += 1
                loss = 0.2 + math.exp(-self.step / 40) + 0.05 * math.sin(self.step)
                self.records.append({
                    "time": time.time(), "step": self.step, "loss": loss, "loss_avg": 0.2 + math.exp(-self.step / 40),
                    "samples_per_second": 40.0 + (self.step % 5), "local_epoch": self.step // 20,
                    "swarm_epoch": self.step // 20, "swarm_samples": (self.step % 20) * 64, "target_batch_size": 1280,
                    "skipped_steps": 0,
                })
                if self.step % 5 == 0:  # an averaging round, as health.RoundLog writes them; every 4th fails
                    failed = self.step % 20 == 0
                    self.records.append({"time": time.time(), "round": {
                        "kind": "gradients", "swarm_step": self.step // 20, "group_size": 1 if failed else 2,
                        "swarm_peers": 2, "outcome": "failed" if failed else "complete",
                        "bytes_sent": 0 if failed else 3_400_000, "bytes_received": 0 if failed else 3_400_000,
                        "duration": 1.5}})
                wanted, self._checkpoint_wanted = self._checkpoint_wanted, False
                step = self.step
            if wanted:
                self.write_checkpoint(step)
            if step % 25 == 0:
                self.write_sample(step)

    # --- files in the trainer's layout ---
    def write_checkpoint(self, step: int, *, single_file: bool = False) -> Path:
        root = self.output_dir / "checkpoints"
        final = root / f"step_{step:08d}"
        if final.exists():  # asked twice at one step: the one there is it
            return final
        with atomic_path(final) as tmp:
            for rel, content in MODEL_FILES.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(content)
            # as the real one: the config names this machine's folders, so the UI must never hand it out
            (tmp / "config.yaml").write_text(f"output:\n  dir: {self.output_dir}\n", encoding="utf-8")
            # as diffusers and transformers write them: each part's config names where the model was loaded from
            (tmp / "unet" / "config.json").write_text(json.dumps(
                {"_class_name": "UNet2DConditionModel", "_name_or_path": str(self.output_dir / "checkpoints" / "x"),
                 "sample_size": 64}), encoding="utf-8")
            (tmp / "text_encoder").mkdir(exist_ok=True)
            (tmp / "text_encoder" / "config.json").write_text(json.dumps(
                {"_name_or_path": str(Path.home() / "models" / "sd-base"), "hidden_size": 768,
                 "note": f"loaded from {self.output_dir.parent}/elsewhere"}), encoding="utf-8")
            (tmp / "training_state.pt").write_bytes(b"state" * 1000)
            if single_file:
                (tmp / f"{final.name}.safetensors").write_bytes(b"single-file-export" * 100)
        return final

    def write_sample(self, step: int) -> Path:
        path = self.output_dir / "samples" / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (256, 128), (40 + step % 200, 90, 160))
        for x in range(0, 256, 32):  # a visible pattern, so a screenshot shows something
            image.paste((230, 200 - step % 100, 60), (x, 32, x + 16, 96))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())
        return path

    # --- NodeAccess ---
    def status(self) -> dict:
        with self._lock:
            last = self.records[-1] if self.records else {}
            now = time.time()
            peers = [
                {"peer_id": "QmMotherPeerIdentity000000000000000000000001", "role": "mother",
                 "address": f"127.0.0.1:{self.join_port}", "step": self.step, "samples_seen": self.step * 64,
                 "loss": last.get("loss_avg"), "samples_per_second": last.get("samples_per_second", 0.0),
                 "local_epoch": last.get("local_epoch", 0), "time": now - 1, "grad_norm": 0.42,
                 "rounds": [{"kind": "gradients", "outcome": "complete", "group_size": 2},
                            {"kind": "parameters", "outcome": "failed", "group_size": 1}]},
                {"peer_id": "QmFriendPeerIdentity000000000000000000000002", "role": "client", "address": None,
                 "step": max(0, self.step - 3), "samples_seen": self.step * 60,
                 "loss": (last.get("loss_avg") or 1.0) * 1.1, "samples_per_second": 35.5,
                 "local_epoch": last.get("local_epoch", 0), "time": now - 4},
                {"peer_id": "<b>QmNewPeer</b>", "role": "relay", "address": "<img src=x onerror=alert(1)>:1",
                 "step": 0, "samples_seen": 0, "loss": None, "samples_per_second": 0.0, "local_epoch": 0,
                 "time": now - 30},  # a hostile peer's strings: shown as text, never as HTML
            ]
            return {
                "state": self.state,
                "run_id": "fake-run",
                "progress": {
                    "step": self.step, "samples_seen": self.step * 64, "loss": last.get("loss", math.nan),
                    "loss_avg": last.get("loss_avg", math.nan), "samples_per_second": last.get("samples_per_second", 0),
                    "local_epoch": last.get("local_epoch", 0), "swarm_epoch": last.get("swarm_epoch", 0),
                    "swarm_samples": last.get("swarm_samples", 0), "target_batch_size": 1280, "skipped_steps": 0,
                },
                "swarm": {"run_id": "fake-run", "epoch": last.get("swarm_epoch", 0),
                          "samples_toward_target": last.get("swarm_samples", 0), "target_batch_size": 1280,
                          "samples_per_second": 75.5, "spread": 0.02, "spread_step": 3, "peers": peers},
                "data": {"chunks": 2, "pairs_ready": 1900, "pairs_fetched": 1700, "pairs_cached": 200,
                         "discarded": {"bad image": 12, "empty caption": 3, "missing half": 1},
                         "bytes_fetched": 512_000_000, "cache_pairs": 1900, "cache_bytes": 800_000_000,
                         "waited_s": 3.25, "rejected_posts": 16, "skipped_rejected": 40,
                         "last_rejected": ["5012: md5 mismatch", "4977: json unreadable (not JSON)"],
                         "workdir": str(self.output_dir / "workdir"), "note": self.leak},
                "training": {"mode": "lora", "rank": 32, "alpha": 32.0, "text_encoder": True, "parameters": 18_874_368,
                             "megabytes": 75.5, "base_model": {"model": "runwayml/stable-diffusion-v1-5",
                                                               "sha256": "0123456789abcdef" * 4}},
                "join_command": f"sdswarm join 127.0.0.1:{self.join_port}",
                "announced": ["/ip4/127.0.0.1/tcp/31337/p2p/QmMotherPeerIdentity000000000000000000000001"],
            }

    def history(self) -> list[dict]:
        with self._lock:
            return list(self.records)

    def log_tail(self, lines: int) -> list[str]:
        with self._lock:
            step = self.step
        tail = [f"step {s}  loss {0.2 + math.exp(-s / 40):.4f}" for s in range(max(0, step - 40), step)]
        tail += [f"saved checkpoint {self.output_dir / 'checkpoints' / 'step_00000001'}",
                 f"HTTP server listening on 127.0.0.1:{self.join_port}", f"token is {self.leak}"]
        return tail[-lines:]

    def settings(self) -> NodeSettings:
        return self._settings

    def update_settings(self, changes: dict) -> NodeSettings:
        self.calls.append("update_settings")
        updated = update_settings(self._settings, changes)  # ConfigError naming the key, as the node's
        save_settings(updated, self.output_dir)
        self._settings = updated
        return updated

    def _control(self, name: str) -> None:
        self.calls.append(name)
        if self.control_delay:
            time.sleep(self.control_delay)
        if self.control_error is not None:
            error, self.control_error = self.control_error, None
            raise error

    def start(self) -> None:
        self._control("start")
        with self._lock:
            self.state = "training"

    def stop(self) -> None:
        self._control("stop")
        with self._lock:
            step, self.state = self.step, "stopped"
        self.write_checkpoint(step)

    def invite(self, hours: float) -> str:
        self.calls.append("invite")
        return f"python server.py -j 127.0.0.1:8765 --invite fake-{hours:g}h"

    def ban(self, peer_ids: list[str], lift: bool) -> list[str]:
        self.calls.append("ban")
        if not all(p.startswith("Qm") for p in peer_ids):
            raise ConfigError(f"{peer_ids[0]!r} is not a peer id")
        return [] if lift else sorted(peer_ids)

    def save_checkpoint(self) -> None:
        self._control("save_checkpoint")
        with self._lock:
            self._checkpoint_wanted = True
