"""The chunks this peer trains, one per round: drawn from the index by the shard plan, fetched from the
bucket, checked and captioned, cached in the work dir; the next round is prepared in the background.

A post that cannot be trained on (a half missing, bad JSON, empty caption, a bad image, ...) is discarded,
counted by reason and logged; it never stops the run. `stats()` is a snapshot the log and the UI read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdswarm.config import DataConfig
from sdswarm.data import images
from sdswarm.data.bucket import Bucket, Fetched, FetchSettings, download, is_url
from sdswarm.data.captions import DEFAULT_CATEGORIES, caption_from_post, check_categories
from sdswarm.data.demo import BUILTIN_DEMO, make_demo_dataset, make_demo_index
from sdswarm.data.index import Index, Post, build_from_folder
from sdswarm.data.index_share import IndexUnavailable, check_same_index, fetch_index, file_sha256
from sdswarm.data.legacy_index import is_legacy, open_legacy
from sdswarm.data.rejects import RejectedPosts
from sdswarm.data.shards import ShardPlan, assign_slots
from sdswarm.data.workdir import Pair, WorkDir, caption_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionSettings:
    categories: tuple[str, ...] = DEFAULT_CATEGORIES
    separator: str = ", "
    escape_parentheses: bool = False

    def __post_init__(self) -> None:
        check_categories(self.categories)

    def key(self) -> str:
        return caption_key(**asdict(self))


@dataclass(frozen=True)
class DataStats:
    """What the data pipeline has done so far (since start-up)."""

    chunks: int = 0  # rounds prepared
    pairs_ready: int = 0  # pairs handed to training
    pairs_fetched: int = 0  # of which downloaded (or read from a folder bucket), checked and cached
    pairs_cached: int = 0  # of which found in the work dir
    discarded: dict[str, int] = field(default_factory=dict)  # reason -> posts
    bytes_fetched: int = 0
    cache_pairs: int = 0
    cache_bytes: int = 0
    waited_s: float = 0.0  # time training waited for a chunk to be ready
    rejected_posts: int = 0  # posts remembered as untrainable (beside the work dir)
    skipped_rejected: int = 0  # of the posts drawn, left out without fetching: remembered as rejected
    last_rejected: list[str] = field(default_factory=list)  # the newest rejections, "post id: reason"

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.discarded.items(), key=lambda kv: -kv[1]))
        return (f"{self.pairs_ready} pairs ready in {self.chunks} chunks ({self.pairs_fetched} fetched, "
                f"{self.pairs_cached} cached), {sum(self.discarded.values())} discarded ({reasons or 'none'}), "
                f"{self.bytes_fetched / 1e6:.1f} MB fetched, cache {self.cache_pairs} pairs / "
                f"{self.cache_bytes / 1e6:.1f} MB, waited {self.waited_s:.1f} s, {self.rejected_posts} posts "
                f"remembered as rejected ({self.skipped_rejected} skipped unfetched)")


class ChunkSource:
    """`pairs(round)`: this peer's pairs for a round, in chunk order; the next round is prefetched.

    `slot`: the peer's slot in the shard plan; or None with `choose_slot`, which picks the slot before each
    round from the current one (None at first, or the slot a resumed run trained in), as shards.choose_slot
    does with the swarm's view. `rejects`: posts remembered as untrainable, skipped without fetching."""

    LAST_REJECTED = 8  # rejections shown in the log line and the UI

    def __init__(
        self,
        *,
        index: Index,
        bucket: Bucket,
        workdir: WorkDir,
        plan: ShardPlan,
        slot: int | None,
        choose_slot: Callable[[int | None], int] | None = None,
        captions: CaptionSettings = CaptionSettings(),
        max_pixels: int = images.DEFAULT_MAX_PIXELS,
        decode_workers: int = min(4, os.cpu_count() or 1),
        rejects: RejectedPosts | None = None,
    ) -> None:
        if plan.size != len(index):
            raise ValueError(f"shard plan for {plan.size} posts, index has {len(index)}")
        if slot is None and choose_slot is None:
            raise ValueError("ChunkSource needs a slot or a choose_slot")
        self.index, self.bucket, self.workdir, self.plan = index, bucket, workdir, plan
        self.slot, self.choose_slot = slot, choose_slot
        self.slots: dict[int, int] = {}  # round -> the slot it was drawn from
        self.rejects = rejects
        self.captions, self.max_pixels = captions, max_pixels
        self._lock = threading.Lock()  # counters and the work dir are shared with the decode threads
        self._counts: Counter[str] = Counter()
        self._discarded: Counter[str] = Counter()
        self._waited = 0.0
        self._jobs: dict[int, Future[list[Pair]]] = {}
        self._pinned: dict[int, set[int]] = {}  # round -> post ids its pairs need kept in the cache
        self._decode = ThreadPoolExecutor(max(1, decode_workers), thread_name_prefix="sdswarm-decode")
        self._queue: queue.Queue[tuple[int, Future[list[Pair]]] | None] = queue.Queue()
        # daemon: a download stuck in its timeouts must not hold the process open at exit
        self._thread = threading.Thread(target=self._work, name="sdswarm-prefetch", daemon=True)
        self._thread.start()

    # --- the trainer's side ---------------------------------------------------------------------------

    def pairs(self, round_index: int) -> list[Pair]:
        """The round's pairs (blocking until ready); starts preparing the next round."""
        job = self._job(round_index)
        start = time.perf_counter()
        result = job.result()
        with self._lock:
            self._waited += time.perf_counter() - start
        self._job(round_index + 1)
        keep = {round_index, round_index + 1}
        for r in [r for r in self._jobs if r not in keep]:
            del self._jobs[r]
        with self._lock:
            for r in [r for r in self._pinned if r not in keep]:
                del self._pinned[r]
        return result

    def stats(self) -> DataStats:
        with self._lock:
            c = self._counts
            return DataStats(
                chunks=c["chunks"], pairs_ready=c["ready"], pairs_fetched=c["fetched"], pairs_cached=c["cached"],
                discarded=dict(self._discarded), bytes_fetched=c["bytes"], cache_pairs=len(self.workdir),
                cache_bytes=self.workdir.bytes, waited_s=self._waited,
                rejected_posts=len(self.rejects) if self.rejects is not None else 0,
                skipped_rejected=c["skipped_rejected"],
                last_rejected=[f"{post_id}: {reason}" for post_id, reason in
                               (self.rejects.last(self.LAST_REJECTED) if self.rejects is not None else [])],
            )

    def slot_of(self, round_index: int) -> int | None:
        """The slot round `round_index` was drawn from (None if not drawn yet)."""
        return self.slots.get(round_index)

    def close(self) -> None:
        self._queue.put(None)
        self._decode.shutdown(wait=False, cancel_futures=True)
        self._thread.join(timeout=1.0)

    def _job(self, round_index: int) -> Future[list[Pair]]:
        if round_index not in self._jobs:
            self._jobs[round_index] = Future()
            self._queue.put((round_index, self._jobs[round_index]))
        return self._jobs[round_index]

    # --- the prefetch thread --------------------------------------------------------------------------

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            round_index, job = item
            if not job.set_running_or_notify_cancel():
                continue
            try:
                job.set_result(self._materialize(round_index))
            except BaseException as exc:  # handed to the trainer, which raises it
                job.set_exception(exc)

    def _materialize(self, round_index: int) -> list[Pair]:
        start = time.perf_counter()
        before = self.stats()
        if self.choose_slot is not None:
            self.slot = self.choose_slot(self.slot)
        self.slots[round_index] = self.slot
        posts = self.index.posts_at(self.plan.chunk(round_index, self.slot))
        drawn = len(posts)
        with self._lock:
            if self.rejects is not None:
                posts = [p for p in posts if not self.rejects.skip(p.post_id)]
                self._counts["skipped_rejected"] += drawn - len(posts)
            self._pinned[round_index] = {p.post_id for p in posts}
        ready: dict[int, Pair] = {}
        missing: list[Post] = []
        for post in posts:
            pair = self._cached(post)
            if pair is None:
                missing.append(post)
            else:
                ready[post.post_id] = pair
        cached = len(ready)

        async def fetch_all() -> None:
            loop = asyncio.get_running_loop()

            async def handle(fetched: Fetched) -> None:
                with self._lock:
                    self._counts["bytes"] += fetched.nbytes
                if fetched.reason is not None:
                    self._discard(fetched.post, fetched.reason, transient=fetched.transient)
                    return
                pair = await loop.run_in_executor(self._decode, self._admit, fetched)
                if pair is not None:
                    ready[fetched.post.post_id] = pair

            await self.bucket.fetch_many(missing, handle)

        if missing:
            asyncio.run(fetch_all())
        pairs = [ready[p.post_id] for p in posts if p.post_id in ready]
        with self._lock:
            if self.rejects is not None:
                for post_id in ready:
                    self.rejects.forget(post_id)  # a passing failure that passed
                self.rejects.save()
            self.workdir.evict(keep=set().union(*self._pinned.values()))
            self._counts["chunks"] += 1
            self._counts["ready"] += len(pairs)
            self._counts["cached"] += cached
        after = self.stats()
        discarded = {r: n - before.discarded.get(r, 0) for r, n in after.discarded.items()
                     if n > before.discarded.get(r, 0)}
        fetched = after.pairs_fetched - before.pairs_fetched
        # A round served from the cache is routine (every second or two on the demo): DEBUG, not shown.
        level = logging.INFO if fetched or discarded or len(pairs) < drawn else logging.DEBUG
        log.log(level, "round %d (slot %d): %d of %d posts ready (%d fetched, %d cached, %d skipped as rejected "
                "before) in %.1f s; discarded: %s; %.1f MB fetched; cache %d pairs, %.1f MB", round_index, self.slot,
                len(pairs), drawn, fetched, cached, after.skipped_rejected - before.skipped_rejected,
                time.perf_counter() - start, discarded or "none", (after.bytes_fetched - before.bytes_fetched) / 1e6,
                after.cache_pairs, after.cache_bytes / 1e6)
        if after.rejected_posts:
            log.info("rejected posts: %d remembered in %s, never fetched again; newest: %s", after.rejected_posts,
                     self.rejects.path, ", ".join(after.last_rejected))
        return pairs

    def _cached(self, post: Post) -> Pair | None:
        with self._lock:
            pair = self.workdir.get(post.post_id)
        if pair is None:
            return None
        try:
            info = images.probe(pair.image, max_pixels=self.max_pixels)
        except images.ImageRejected:  # damaged on disk since: fetch it again
            with self._lock:
                self.workdir.drop(post.post_id)
            return None
        pair.size = (info.width, info.height)
        return pair

    def _admit(self, fetched: Fetched) -> Pair | None:
        """Decode-thread half: caption and check a fetched pair, then cache it. None if discarded."""
        post, c = fetched.post, self.captions
        assert fetched.image is not None and fetched.meta is not None
        try:
            meta = json.loads(fetched.meta.decode("utf-8-sig"))
        except ValueError:  # not UTF-8, or not JSON at all (an error page, a cut file)
            self._discard(post, "json unreadable (not JSON)")
            return None
        try:
            caption = caption_from_post(meta, c.categories, c.separator, c.escape_parentheses)
        except ValueError as exc:  # JSON, but not a post shape we read
            self._discard(post, "json of an unknown shape", str(exc))
            return None
        if not caption:
            self._discard(post, "empty caption")
            return None
        try:
            info = images.check(fetched.image, post.ext, max_pixels=self.max_pixels)
        except images.ImageRejected as rejected:
            self._discard(post, rejected.reason, str(rejected))
            return None
        with self._lock:
            pair = self.workdir.put(post.post_id, post.ext, fetched.image, caption)
            self._counts["fetched"] += 1
        pair.size = (info.width, info.height)
        return pair

    def _discard(self, post: Post, reason: str, detail: str = "", transient: bool = False) -> None:
        log.debug("post %d discarded: %s", post.post_id, detail or reason)
        with self._lock:
            self._discarded[reason] += 1
            if self.rejects is not None:
                self.rejects.add(post.post_id, reason, transient)


@dataclass(frozen=True)
class SharedIndex:
    """The index a peer trains on: the file as given (or downloaded), which relays serve and its sha256 names,
    and the sdswarm index read from it (the same file, or converted from the how-to's db)."""

    file: Path
    sha256: str
    path: Path


def resolve_index(data: DataConfig, *, out: Path, demo_dir: Path, cache: Path, relay: str | None = None
                  ) -> SharedIndex:
    """The index this peer trains on, checked against the swarm's (`data.index_sha256`, when set).

    `data.index` (a file, or an http(s) URL fetched once into `out`) if given; else, on a joiner (`relay`: its
    relay's base URL), the swarm's index downloaded from the relay into `cache`; else the demo's, or one built
    from the source folder into `out` (rebuilt when it was built from another folder)."""
    if data.index and is_url(data.index):
        if not out.is_file():
            log.info("downloading the index %s", data.index)
            download(data.index, out)
        file = out
    elif data.index:
        file = Path(data.index).expanduser()
        if not file.is_file():
            raise IndexUnavailable(
                f"data.index {data.index!r} ({file.absolute()}) does not exist: put the how-to's SQLite db there "
                "(a posts table with post_id, ext, rating), or build an index from a Danbooru metadata dump: "
                f"sdswarm index build --from-dump posts.json --out {data.index}")
    elif data.index_sha256 and relay:
        file = fetch_index(relay, data.index_sha256, cache)
    elif data.source == BUILTIN_DEMO:
        file = make_demo_index(demo_dir)  # makes the files too: every node has them, every relay serves them
    elif not is_url(data.source):
        file = _folder_index(Path(data.source), out)
    else:
        raise IndexUnavailable("data.index is required when data.source is a URL: the posts to fetch come from it "
                               "(the how-to's db, or: sdswarm index build --from-dump posts.json --out index.db)")
    sha256 = file_sha256(file)
    check_same_index(sha256, data.index_sha256, str(file))
    path = open_legacy(file, sha256) if is_legacy(file) else file
    log.info("index %s: sha256 %s", file, sha256)
    return SharedIndex(file=file, sha256=sha256, path=path)


def _folder_index(folder: Path, out: Path) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f"data.source {str(folder)!r} is not a folder, an http(s) URL or builtin:demo")
    if out.is_file():
        with Index(out) as existing:
            if existing.meta.get("source") == str(folder.resolve()):
                return out
    log.info("indexing %s into %s", folder, out)
    log.info("index %s: %s", out, build_from_folder(folder, out))
    return out


def rejects_file(workdir: Path) -> Path:
    """Beside the work dir: the rejected posts outlive a cleared work dir, and stay out of its pairs."""
    return workdir.parent / f"{workdir.name}.rejected.json"


def open_chunks(
    data: DataConfig,
    *,
    seed: int,
    peer_id: str,
    workdir: Path,
    index_out: Path,
    demo_dir: Path,
    peers: Sequence[str] | None = None,
    choose_slot: Callable[[int | None], int] | None = None,
    demo_mirror: str | None = None,
    index: SharedIndex | None = None,
    start_slot: int | None = None,
) -> ChunkSource:
    """The data section -> this peer's chunk source. `peers`: a membership view all peers share, for distinct
    slots (see shards.py); without one, the peer takes its preferred slot; `choose_slot`: pick it before each
    round instead (a swarm, whose members change), starting from `start_slot` (a resumed run's). `index`: the
    index resolved already (resolve_index), else resolved here with `index_out` for one built from a folder or
    downloaded; `demo_dir`: where builtin:demo is generated; `demo_mirror`: fetch the demo's files over HTTP
    from there (a relay's data route, as a joiner does) instead of reading them."""
    if index is None:
        index = resolve_index(data, out=index_out, demo_dir=demo_dir, cache=index_out.parent)
    if data.source == BUILTIN_DEMO:
        folder: Path | None = make_demo_dataset(demo_dir)  # a relay serves these files to its joiners
        if demo_mirror:
            folder = None
            data = data.model_copy(update={"source": demo_mirror.rstrip("/") + "/"})
    else:
        folder = None if is_url(data.source) else Path(data.source)
        if folder is not None and not folder.is_dir():
            raise FileNotFoundError(f"data.source {data.source!r} is not a folder, an http(s) URL or builtin:demo")
    settings = FetchSettings(concurrency=data.fetch_concurrency, timeout_s=data.fetch_timeout,
                             max_bytes=int(data.max_file_mb * 1e6), retries=data.fetch_retries)
    bucket = Bucket(str(folder) if folder is not None else data.source, data.json_source, settings)
    posts = Index(index.path)
    if len(posts) == 0:
        raise IndexUnavailable(f"the index {index.file} holds no trainable posts "
                               f"(skipped when built: {posts.meta.get('skipped')})")
    plan = ShardPlan(seed=seed, size=len(posts), images_per_chunk=data.images_per_chunk, shards=data.shards)
    slot = None if choose_slot else assign_slots(seed, [*(peers or ()), peer_id], data.shards)[peer_id]
    captions = CaptionSettings(tuple(data.caption_categories), data.caption_separator,
                               data.caption_escape_parentheses)
    cache = WorkDir(workdir, int(data.workdir_max_gb * 1e9), caption_key=captions.key())
    rejects = RejectedPosts(rejects_file(workdir), bucket=f"{bucket!r} {captions.key()}")
    log.info("data: %d posts in %s, files from %s; slot %s of %d; about %d posts per chunk, %d rounds per data "
             "epoch (a walk over the whole index); work dir %s (%d pairs cached, %d posts remembered as rejected)",
             len(posts), index.file, bucket, "chosen each round" if slot is None else slot, data.shards,
             len(posts) // plan.chunks_per_epoch, plan.rounds_per_epoch, workdir, len(cache), len(rejects))
    return ChunkSource(index=posts, bucket=bucket, workdir=cache, plan=plan,
                       slot=slot if slot is not None else start_slot, choose_slot=choose_slot,
                       captions=captions, max_pixels=data.max_image_pixels, rejects=rejects)
