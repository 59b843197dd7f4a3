"""Posts that could not be trained on, remembered by post id so later rounds skip them without fetching.

A bad file stays bad: it is never fetched again from the same bucket. A failure that may pass (a timeout, a
5xx, a dropped connection: the bucket's trouble, not the post's) is skipped for RETRY_AFTER_S, then tried
again. The list lives in one JSON file beside the work dir, rewritten atomically; another bucket starts it
afresh (its posts are other files).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from sdswarm.atomic import write_atomic

log = logging.getLogger(__name__)

RETRY_AFTER_S = 24 * 3600.0
VERSION = 1


class RejectedPosts:
    def __init__(self, path: Path, bucket: str) -> None:
        self.path, self.bucket = Path(path), bucket
        self._posts: dict[int, tuple[str, float, bool]] = {}  # post id -> (reason, when, may pass); oldest first
        self._dirty = False
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("rejected posts %s unreadable (%s): starting a new list", self.path, exc)
            return
        if not isinstance(saved, dict) or saved.get("version") != VERSION or saved.get("bucket") != bucket:
            log.info("rejected posts %s were for another bucket: starting a new list", self.path)
            return
        for post_id, (reason, when, transient) in saved.get("posts", {}).items():
            self._posts[int(post_id)] = (str(reason), float(when), bool(transient))

    def __len__(self) -> int:
        return len(self._posts)

    def skip(self, post_id: int, now: float | None = None) -> bool:
        """Whether to leave this post out without fetching it."""
        entry = self._posts.get(post_id)
        if entry is None:
            return False
        _, when, transient = entry
        return not transient or (now or time.time()) - when < RETRY_AFTER_S

    def add(self, post_id: int, reason: str, transient: bool = False) -> None:
        self._posts.pop(post_id, None)  # re-inserted last: the newest
        self._posts[post_id] = (reason, time.time(), transient)
        self._dirty = True

    def forget(self, post_id: int) -> None:
        """A post that came through after all (a passing failure that passed)."""
        if self._posts.pop(post_id, None) is not None:
            self._dirty = True

    def last(self, n: int) -> list[tuple[int, str]]:
        """The newest `n` rejections, newest first: (post id, reason)."""
        return [(post_id, entry[0]) for post_id, entry in list(self._posts.items())[-n:][::-1]]

    def save(self) -> None:
        if not self._dirty:
            return
        posts = {str(post_id): list(entry) for post_id, entry in self._posts.items()}
        data = {"version": VERSION, "bucket": self.bucket, "posts": posts}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(data).encode())
        self._dirty = False
