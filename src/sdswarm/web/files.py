"""The files the UI offers: checkpoints (as a zip built on the fly, or a single-file export) and sample grids.

Only what these listings return can be downloaded: a requested name is looked up in the listing, never
joined onto a path, so `../`, absolute paths, symlinks out of the folder and odd names all answer 404.
The layout is the one train/checkpoint.py and train/samples.py write:
    OUTPUT/checkpoints/step_NNNNNNNN/   a diffusers folder + training_state.pt + config.yaml
    OUTPUT/checkpoints/step_NNNNNNNN/*.safetensors   a single-file export, when one was made
    OUTPUT/samples/step_NNNNNNNN.png
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdswarm.train.checkpoint import CHECKPOINT_NAME, CONFIG_FILE, STATE_FILE

SAMPLE_NAME = re.compile(r"^step_(\d{8,})\.png$")
# left out of every download: the checkpoint's config.yaml names this machine's folders (output, data source)
PRIVATE_FILES = {CONFIG_FILE}
CHUNK = 1 << 20
# the parts' config files (unet/config.json, text_encoder/config.json, adapter_config.json, model_index.json...)
# record where the model was loaded from: `_name_or_path` is left out of the zip, other strings go through the
# redactor, as everything else the UI sends
MODEL_CONFIG = re.compile(r"(^|/)(model_index|[\w.-]*config)\.json$")
NAME_KEYS = ("_name_or_path", "name_or_path")
MAX_MODEL_CONFIG = 1 << 20  # config files are a few KB; anything larger is sent as it is


@dataclass(frozen=True)
class Checkpoint:
    name: str
    step: int
    path: Path
    time: float  # when it was written
    single_file: Path | None  # an original-layout .safetensors export inside the folder, if any

    def files(self, *, with_state: bool) -> list[tuple[Path, str]]:
        """(file, name in the zip) for every regular file below the folder; symlinks are not followed."""
        found = []
        for folder, dirs, names in os.walk(self.path, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                path = Path(folder) / name
                rel = path.relative_to(self.path).as_posix()
                if name.startswith(".") or path.is_symlink() or not path.is_file() or rel in PRIVATE_FILES:
                    continue
                if path == self.single_file or (rel == STATE_FILE and not with_state):
                    continue
                found.append((path, f"{self.name}/{rel}"))
        return found


def list_checkpoints(output_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, newest first."""
    root = Path(output_dir) / "checkpoints"
    found = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    for entry in entries:
        match = CHECKPOINT_NAME.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        path = Path(entry.path)
        state = path / STATE_FILE  # present once a checkpoint is complete
        if not state.is_file():
            continue  # still being written or broken: never offered
        exports = sorted(p for p in path.glob("*.safetensors") if p.is_file() and not p.is_symlink())
        found.append(Checkpoint(name=entry.name, step=int(match.group(1)), path=path, time=state.stat().st_mtime,
                                single_file=exports[0] if exports else None))
    return sorted(found, key=lambda c: -c.step)


def checkpoints_version(output_dir: Path) -> tuple:
    """Changes when a checkpoint is added, removed or replaced, or a file added to or removed from one (an
    export): the names and modification times of the entries of the checkpoints folder. Cheap: no walk."""
    try:
        return tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(Path(output_dir) / "checkpoints")))
    except OSError:
        return ()


def find_checkpoint(output_dir: Path, name: str) -> Checkpoint | None:
    return next((c for c in list_checkpoints(output_dir) if c.name == name), None)


@dataclass(frozen=True)
class Sample:
    name: str
    step: int
    path: Path
    time: float


def list_samples(output_dir: Path) -> list[Sample]:
    """Sample grids, newest first."""
    try:
        entries = list(os.scandir(Path(output_dir) / "samples"))
    except OSError:
        return []
    found = []
    for entry in entries:
        match = SAMPLE_NAME.match(entry.name)
        if match and not entry.is_symlink() and entry.is_file():
            found.append(Sample(entry.name, int(match.group(1)), Path(entry.path), entry.stat().st_mtime))
    return sorted(found, key=lambda s: -s.step)


def find_sample(output_dir: Path, name: str) -> Sample | None:
    return next((s for s in list_samples(output_dir) if s.name == name), None)


def folder_size(checkpoint: Checkpoint, *, with_state: bool) -> int:
    return sum(path.stat().st_size for path, _ in checkpoint.files(with_state=with_state))


class _Sink:
    """A write-only, unseekable file for zipfile (which then writes data descriptors): bytes go out in
    1 MB pieces through `send`, which blocks until the client has taken them, so memory stays bounded."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self.send, self.buffer = send, bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        if len(self.buffer) >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            self.send(bytes(self.buffer))
            self.buffer.clear()


def write_zip(files: list[tuple[Path, str]], send: Callable[[bytes], None],
              redact: Callable[[Any], Any] | None = None) -> None:
    """Stream a zip of `files` through `send`. Stored, not deflated: weights do not compress, and the
    zip is built as fast as the disk reads. With `redact`, the model config files leave without local paths."""
    sink = _Sink(send)
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path, arcname in files:
            # knows the size (zip64 only where needed); a pre-1980 mtime is clamped, not an error
            info = zipfile.ZipInfo.from_file(path, arcname, strict_timestamps=False)
            info.compress_type = zipfile.ZIP_STORED
            if redact is not None and MODEL_CONFIG.search(arcname) and info.file_size <= MAX_MODEL_CONFIG:
                archive.writestr(info, redacted_model_config(path.read_bytes(), redact))
                continue
            with open(path, "rb") as source, archive.open(info, "w") as target:
                for piece in _read(source):
                    target.write(piece)
    sink.flush()


def redacted_model_config(data: bytes, redact: Callable[[Any], Any]) -> bytes:
    """A model config file without `_name_or_path` (where the model was loaded from) and with no local path."""
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):
        return data  # not JSON: not a config file the libraries wrote
    if isinstance(config, dict):
        config = {key: value for key, value in config.items() if key not in NAME_KEYS}
    return (json.dumps(redact(config), indent=2, sort_keys=True) + "\n").encode("utf-8")


def _read(handle) -> Iterator[bytes]:
    while piece := handle.read(CHUNK):
        yield piece
