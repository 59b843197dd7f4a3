"""Data pipeline figures (not a test): pairs/s through the whole pipeline against a bare PIL loop over the same
files in the same run, and index open + draw time at millions of rows.

    .venv/bin/python bench/data_pipeline.py [--images 400] [--rows 5000000] [--workers 2]

Pipeline: a local HTTP bucket (the mother's own `bucket_routes`) -> fetch both halves -> md5 -> check the image
-> caption -> work dir -> decode -> resize to the aspect bucket -> tensor batches. Baseline: for each file,
Image.open + convert("RGB") + resize to the same bucket, one thread.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from sdswarm.data.aspect import assign_aspect_bucket, make_aspect_buckets
from sdswarm.data.bucket import Bucket, FetchSettings, bucket_routes
from sdswarm.data.chunks import ChunkSource
from sdswarm.data.index import Index, _write_index, build_from_folder
from sdswarm.data.loader import BatchStream
from sdswarm.data.shards import ShardPlan
from sdswarm.data.workdir import WorkDir

SIZES = [(1024, 768), (768, 1024), (1200, 1200), (850, 1200), (1600, 900)]  # typical booru uploads


def make_images(folder: Path, count: int, unique: int = 25) -> int:
    """JPEGs that compress like drawings (smooth areas, edges, a little grain), with API-shaped JSON; `unique`
    distinct pictures, repeated under other post ids (decoding costs the same, generating them does not)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pictures: list[bytes] = []
    for i in range(unique):
        w, h = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=-1)
        for _ in range(6):  # a few flat blobs
            cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(50, 300)
            base[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 255, 3)
        base += rng.normal(0, 4, base.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        pictures.append(buf.getvalue())
    total = 0
    for post_id in range(1, count + 1):
        data = pictures[post_id % unique]
        (folder / f"{post_id}.jpg").write_bytes(data)
        total += len(data)
        w, h = SIZES[(post_id % unique) % len(SIZES)]
        post = {"id": post_id, "md5": hashlib.md5(data).hexdigest(), "file_ext": "jpg", "image_width": w,
                "image_height": h, "tag_string_general": "1girl solo long_hair smile", "tag_string_character": "",
                "tag_string_copyright": "original", "tag_string_artist": "someone", "tag_string_meta": "highres"}
        (folder / f"{post_id}.json").write_text(json.dumps(post))
    return total


def serve(folder: Path) -> tuple[str, callable]:
    from aiohttp import web

    loop = asyncio.new_event_loop()
    ready, state = threading.Event(), {}

    async def start() -> None:
        app = web.Application()
        app.add_routes(bucket_routes(folder))
        state["runner"] = runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        state["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}/bucket/"

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    ready.wait()

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)

    return state["url"], stop


def bare_loop(folder: Path, count: int, buckets) -> float:
    start = time.perf_counter()
    for post_id in range(1, count + 1):
        with Image.open(folder / f"{post_id}.jpg") as image:
            bucket = assign_aspect_bucket(*image.size, buckets)
            image.convert("RGB").resize((bucket.width, bucket.height), Image.Resampling.LANCZOS)
    return count / (time.perf_counter() - start)


def pipeline(index: Path, work: Path, count: int, buckets, workers: int, url: str) -> tuple[float, str]:
    """From an empty work dir: every pair fetched, checked, cached, then decoded into batches."""
    plan = ShardPlan(seed=0, size=count, images_per_chunk=count // 4, shards=1)  # 4 rounds
    chunks = ChunkSource(index=Index(index), bucket=Bucket(url, settings=FetchSettings(concurrency=16)),
                         workdir=WorkDir(work, 10**11), plan=plan, slot=0, decode_workers=workers)
    stream = BatchStream(chunks, buckets, batch_size=8, shuffle=True, seed=0, num_workers=workers)
    start, samples = time.perf_counter(), 0
    for round_index, _, batch in stream.iterate():
        if round_index == plan.rounds_per_epoch:
            break
        samples += len(batch.captions)
    elapsed = time.perf_counter() - start
    stats = stream.stats()
    stream.close()
    return count / elapsed, f"{stats.summary()}; {samples} samples in batches"


DRAW = """
import json, sys, time
from sdswarm.data.index import Index
from sdswarm.data.shards import ShardPlan
def rss_kb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
rss0 = rss_kb()
t1 = time.perf_counter()
index = Index(sys.argv[1])
plan = ShardPlan(seed=42, size=len(index), images_per_chunk=1000, shards=64)
posts = index.posts_at(plan.chunk(123, 17))
t2 = time.perf_counter()
more = []
for r in range(20):
    s = time.perf_counter(); index.posts_at(plan.chunk(1000 + r, r % 64)); more.append(time.perf_counter() - s)
rss1 = rss_kb()
print(json.dumps({"open_draw_s": t2 - t1, "draw_s": sorted(more)[10], "posts": len(posts), "rows": len(index),
                  "rss_growth_mb": (rss1 - rss0) / 1024}))
"""


def index_figures(path: Path, rows: int) -> dict:
    start = time.perf_counter()
    generated = ((i * 7 + 3, "jpg", f"{i:032x}", 1000, 1400, 500_000, "g", 30) for i in range(rows))
    _write_index(path, generated, Counter(), source="generated")
    build_s = time.perf_counter() - start
    subprocess.run(["sync"], check=False)
    out = subprocess.run([sys.executable, "-c", DRAW, str(path)], capture_output=True, text=True, check=True)
    return {"build_s": build_s, "size_mb": path.stat().st_size / 1e6, **json.loads(out.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    buckets = make_aspect_buckets(args.resolution, 256, 768, step=64)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        total = make_images(tmp / "bucket", args.images)
        build_from_folder(tmp / "bucket", tmp / "index.db")
        print(f"{args.images} JPEGs, {total / 1e6:.1f} MB, sizes {SIZES}; resolution {args.resolution}; "
              f"{os.cpu_count()} cores, {args.workers} decode/load threads")
        url, stop = serve(tmp / "bucket")
        bare, piped, detail = [], [], ""
        try:
            for trial in range(args.trials):  # interleaved, best of each: the machine may be shared
                bare.append(bare_loop(tmp / "bucket", args.images, buckets))
                rate, detail = pipeline(tmp / "index.db", tmp / f"work{trial}", args.images,
                                        buckets, args.workers, url)
                piped.append(rate)
        finally:
            stop()
        print(f"bare PIL decode + resize, 1 thread:   {max(bare):7.1f} pairs/s  (trials: "
              f"{', '.join(f'{b:.1f}' for b in bare)})")
        print(f"whole pipeline over local HTTP:       {max(piped):7.1f} pairs/s  (trials: "
              f"{', '.join(f'{p:.1f}' for p in piped)})")
        print(f"ratio pipeline / bare: {max(piped) / max(bare):.2f}")
        print(f"  last trial: {detail}")
        if args.rows:
            figures = index_figures(tmp / "big.db", args.rows)
            print(f"index of {figures['rows']:,} rows: built in {figures['build_s']:.1f} s, "
                  f"{figures['size_mb']:.0f} MB on disk")
            print(f"  open + draw one chunk ({figures['posts']} posts), fresh process: "
                  f"{figures['open_draw_s'] * 1000:.1f} ms; a further draw: {figures['draw_s'] * 1000:.1f} ms "
                  f"(median); memory growth {figures['rss_growth_mb']:.1f} MB")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
