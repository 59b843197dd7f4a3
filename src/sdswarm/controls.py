"""What a running node shows its UI and the few things the UI may ask of it (web.app.NodeAccess)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from sdswarm.data.chunks import DataStats
from sdswarm.swarm.admission import Admission
from sdswarm.swarm.invites import AdmissionError, ban, join_command, make_invite
from sdswarm.swarm.settings import SETTINGS_FILE, NodeSettings, load_settings, save_settings, update_settings
from sdswarm.swarm.telemetry import SwarmView
from sdswarm.train.loop import METRICS_FILE, Trainer
from sdswarm.web.log_tail import LogTail

log = logging.getLogger(__name__)

SWARM_REFRESH = 2.0  # seconds between DHT reads for the UI, however often it polls


class MetricsHistory:
    """The newest `keep` records of a JSON-lines file the trainer appends to (metrics.jsonl), read incrementally:
    each call reads only the bytes appended since the last one."""

    def __init__(self, path: Path, keep: int = 20_000) -> None:
        self.path = path
        self.records: deque[dict] = deque(maxlen=keep)
        self._offset = 0  # bytes of the file already read: complete lines only
        self._lock = threading.Lock()  # the UI's server threads may ask at once

    def read(self) -> list[dict]:
        with self._lock:
            try:
                with open(self.path, "rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    if size < self._offset:  # a new file in its place (another run in this folder): start over
                        self.records.clear()
                        self._offset = 0
                    handle.seek(self._offset)
                    appended = handle.read(size - self._offset)
            except FileNotFoundError:
                return []
            complete = appended[: appended.rfind(b"\n") + 1]  # a line still being written waits for the next call
            self._offset += len(complete)
            for line in complete.splitlines():
                with contextlib.suppress(ValueError):
                    self.records.append(json.loads(line))
            return list(self.records)


class NodeControls:
    """Snapshot and controls of one node. Training runs on the node's main thread; these are called from
    the web server's threads and only read state or set events."""

    def __init__(
        self,
        *,
        trainer: Trainer,
        settings_dir: Path,
        run_id: str,
        swarm_view: Callable[[], SwarmView],
        data_stats: Callable[[], DataStats],
        join_address: str | None,
        announced: list[str],
        log_tail: LogTail,
        stop_training: threading.Event,
        quit: threading.Event,
        training: dict | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.trainer, self.output_dir, self._settings_dir = trainer, trainer.output_dir, settings_dir
        self._run_id, self._swarm_view, self._data_stats = run_id, swarm_view, data_stats
        self.join_address, self._announced, self._log_tail = join_address, announced, log_tail
        self.state = "starting"
        self.training = training  # the mode (full / LoRA rank r) and the size of what the swarm averages
        self.stop_training = stop_training  # stop(), Ctrl-C, SIGTERM: finish the step, checkpoint
        self.quit = quit  # Ctrl-C, SIGTERM: the node exits once training stopped
        self.resume = threading.Event()  # start() after a stop
        self._swarm_cache: tuple[float, dict] = (-SWARM_REFRESH, {})
        self._history = MetricsHistory(self.output_dir / METRICS_FILE)
        self._save_lock = threading.Lock()
        self._admission = admission

    # --- read ---

    def status(self) -> dict:
        stats = self._data_stats()
        return {
            "state": self.state,
            "run_id": self._run_id,
            "progress": self.trainer.progress.snapshot(),
            "swarm": self.swarm(),
            "training": self.training,
            "data": vars(stats),
            "join_command": f"sdswarm join {self.join_address}" if self.join_address else None,
            "announced": self._announced,
        }

    def swarm(self) -> dict:
        """The swarm view (refreshed at most every SWARM_REFRESH seconds): the UI's and the I.E's."""
        fetched_at, view = self._swarm_cache
        if time.monotonic() - fetched_at >= SWARM_REFRESH:
            try:
                view = self._swarm_view().model_dump()
            except Exception as exc:  # a slow or empty DHT must not break the page
                log.debug("swarm view unavailable: %s", exc)
            self._swarm_cache = (time.monotonic(), view)
        return view

    def history(self) -> list[dict]:
        return self._history.read()

    def log_tail(self, lines: int) -> list[str]:
        return list(self._log_tail.lines)[-lines:]

    def settings(self) -> NodeSettings:
        return load_settings(self._settings_dir)

    def update_settings(self, changes: dict) -> NodeSettings:
        updated = update_settings(self.settings(), changes)
        save_settings(updated, self._settings_dir)
        log.info("node settings saved to %s: they apply when the node restarts", self._settings_dir / SETTINGS_FILE)
        return updated

    # --- controls ---

    def start(self) -> None:
        if self.state != "stopped":
            raise RuntimeError(f"training is {self.state}, not stopped")
        self.stop_training.clear()
        self.resume.set()

    def stop(self) -> None:
        if self.state == "stopped":
            raise RuntimeError("training is already stopped")
        self.stop_training.set()

    def invite(self, hours: float) -> str:
        if self._admission is None or self._admission.admitter is None:
            raise AdmissionError("this node holds no swarm key (an open swarm, or not its mother): invites come from "
                                 "the mother")
        address = self.join_address or "HOST:PORT"
        return join_command(address, make_invite(self._admission.admitter.swarm_key, hours))

    def ban(self, peer_ids: list[str], lift: bool) -> list[str]:
        if self._admission is None or self._admission.admitter is None:
            raise AdmissionError("this node holds no swarm key: bans come from the mother")
        return sorted(ban(self.output_dir, peer_ids, lift=lift))

    def save_checkpoint(self) -> None:
        if self.state != "stopped":
            self.trainer.checkpoint_requested.set()  # the training thread saves after its current step
            return
        with self._save_lock:  # stopped: nothing else touches the weights
            self.trainer.save_checkpoint()
