"""The work directory: image + caption ``.txt`` pairs named by post id, a cache bounded in size.

Crash safety: every file is written atomically (sdswarm.atomic: a temp name ``.<name>.<pid>.tmp``, never
an image or .txt suffix, then os.replace); the caption .txt is written after its image, so a pair exists
exactly when its .txt does (and eviction removes the .txt first). This guards against the process dying,
not against power loss (no fsync). On opening, what a dead run left half done is cleared away and the
complete pairs are reused; the least recently used pairs are evicted once the cache is over its bound.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from sdswarm.atomic import TEMP_NAME, write_atomic
from sdswarm.data.images import IMAGE_EXTS

log = logging.getLogger(__name__)

CAPTION_KEY_FILE = ".captions.json"  # how the captions were made; other settings invalidate them
_OURS = re.compile(rf"^\d+\.({'|'.join(sorted(IMAGE_EXTS))}|txt)$")


@dataclass
class Pair:
    """One trainable example on disk."""

    image: Path
    caption: str
    size: tuple[int, int] | None = None  # upright (width, height) when known


def _visible_files(folder: Path) -> list[Path]:
    # Dotfiles are skipped: our temp files, and macOS "._x.jpg" resource forks that look like images.
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def list_pairs(workdir: Path) -> list[Pair]:
    """The complete pairs in `workdir` (image + .txt present), sorted by stem; temp files are ignored."""
    pairs: dict[str, Pair] = {}
    for p in _visible_files(Path(workdir)):
        if p.suffix.lower()[1:] not in IMAGE_EXTS or p.stem in pairs:
            continue
        txt = p.with_suffix(".txt")
        if txt.is_file():
            pairs[p.stem] = Pair(p, txt.read_text(encoding="utf-8").strip())
    return [pairs[s] for s in sorted(pairs)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkDir:
    """Pairs ``{post_id}.{ext}`` + ``{post_id}.txt``, at most `max_bytes` of them (beyond what is pinned).

    `caption_key` describes how captions are made (categories, separator, ...): a work dir made with other
    settings has its pairs dropped rather than trained with stale captions. Not safe for two processes."""

    def __init__(self, root: Path, max_bytes: int, caption_key: str = "") -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._entries: OrderedDict[int, tuple[str, int]] = OrderedDict()  # post id -> (image name, bytes); LRU
        self.bytes = 0
        key_file = self.root / CAPTION_KEY_FILE
        if not key_file.is_file():
            self._check_adoptable()
        stale = key_file.is_file() and key_file.read_text(encoding="utf-8") != caption_key
        self._scan(drop_all=stale)
        if stale:
            log.warning("work dir %s: caption settings changed, cached pairs dropped", self.root)
        write_atomic(key_file, caption_key.encode())

    def _check_adoptable(self) -> None:
        # The scan deletes incomplete pairs: never do that to a folder that is not ours.
        foreign = [p.name for p in _visible_files(self.root) if not _OURS.match(p.name)]
        if foreign:
            raise ValueError(f"work dir {self.root} holds files that are not sdswarm pairs ({foreign[0]}, ...): "
                             "point data.workdir at an empty or new folder")

    def _scan(self, drop_all: bool) -> None:
        images: dict[str, Path] = {}
        captions: set[str] = set()
        for entry in os.scandir(self.root):
            name = entry.name
            temp = TEMP_NAME.match(name)
            if temp and not _pid_alive(int(temp.group(2))):
                Path(entry.path).unlink(missing_ok=True)  # a dead run's half-written file
            if name.startswith(".") or not entry.is_file():
                continue
            stem, _, ext = name.rpartition(".")
            if ext in IMAGE_EXTS:
                images[stem] = Path(entry.path)
            elif ext == "txt":
                captions.add(stem)
        complete: list[tuple[float, int, Path]] = []
        for stem, image in images.items():
            if stem in captions and stem.isdigit() and not drop_all:
                complete.append((os.stat(self.root / f"{stem}.txt").st_mtime, int(stem), image))
            else:
                image.unlink(missing_ok=True)  # its caption never landed: an interrupted materialisation
        for stem in captions - {str(post_id) for _, post_id, _ in complete}:
            (self.root / f"{stem}.txt").unlink(missing_ok=True)
        for _, post_id, image in sorted(complete):  # oldest use first
            size = image.stat().st_size
            self._entries[post_id] = (image.name, size)
            self.bytes += size

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, post_id: int) -> bool:
        return post_id in self._entries

    def get(self, post_id: int) -> Pair | None:
        """The cached pair, marked as just used; None if not cached (or vanished from disk)."""
        entry = self._entries.get(post_id)
        if entry is None:
            return None
        image, txt = self.root / entry[0], self.root / f"{post_id}.txt"
        try:
            caption = txt.read_text(encoding="utf-8").strip()
            os.utime(txt)  # the use order survives a restart
        except OSError:
            self.drop(post_id)
            return None
        self._entries.move_to_end(post_id)
        return Pair(image, caption)

    def put(self, post_id: int, ext: str, data: bytes, caption: str) -> Pair:
        self.drop(post_id)
        image = self.root / f"{post_id}.{ext.lower()}"
        write_atomic(image, data)
        write_atomic(self.root / f"{post_id}.txt", caption.encode("utf-8"))  # last: the pair is now complete
        self._entries[post_id] = (image.name, len(data))
        self.bytes += len(data)
        return Pair(image, caption)

    def drop(self, post_id: int) -> None:
        """Remove a pair (its caption first: no caption, no pair)."""
        entry = self._entries.pop(post_id, None)
        if entry is not None:
            self.bytes -= entry[1]
            (self.root / f"{post_id}.txt").unlink(missing_ok=True)
            (self.root / entry[0]).unlink(missing_ok=True)

    def evict(self, keep: Collection[int] = ()) -> int:
        """Remove least recently used pairs, except those in `keep`, until within the bound; how many."""
        removed = 0
        for post_id in list(self._entries):
            if self.bytes <= self.max_bytes:
                break
            if post_id not in keep:
                self.drop(post_id)
                removed += 1
        if self.bytes > self.max_bytes:
            log.warning("work dir %s holds %.1f MB of pairs in use, over its %.1f MB bound",
                        self.root, self.bytes / 1e6, self.max_bytes / 1e6)
        return removed


def caption_key(**settings: object) -> str:
    return json.dumps(settings, sort_keys=True)
