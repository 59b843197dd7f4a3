import gzip
import io
import json
import sqlite3
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from sdswarm.cli import main
from sdswarm.data.dumps import _json_list_items
from sdswarm.data.index import Index, Post, _write_index, build_from_dump, build_from_folder
from sdswarm.data.shards import ShardPlan
from tests.data import files

HIDDEN = {"id": 7, "file_ext": "jpg", "tag_string_general": "banned_artist", "rating": "e"}  # no md5, no file_url


def api_dump() -> list:
    posts = [files.api_post(i, ext=e) for i, e in [(30, "png"), (10, "jpg"), (20, "webp"), (40, "jpeg")]]
    posts += [files.api_post(50 + i, ext=e) for i, e in enumerate(["gif", "mp4", "webm", "zip", "swf", "avif"])]
    posts += [HIDDEN, files.api_post(10, ext="png"), {"no": "id"}, "not an object", files.api_post(60, ext="")]
    return posts


EXPECTED_SKIPS = {
    "bad record": 1, "duplicate post id": 1, "file type avif": 1, "file type gif": 1, "file type mp4": 1,
    "file type swf": 1, "file type unknown": 1, "file type webm": 1, "file type zip": 1, "hidden (no file)": 1,
    "no post id": 1,
}


def test_api_json_list_dump(tmp_path: Path) -> None:
    (tmp_path / "posts.json").write_text(json.dumps(api_dump(), indent=1))
    report = build_from_dump(tmp_path / "posts.json", tmp_path / "index.db")
    assert (report.rows, report.skipped) == (4, EXPECTED_SKIPS)
    with Index(tmp_path / "index.db") as index:
        assert len(index) == 4 and index.meta["skipped"] == EXPECTED_SKIPS
        posts = index.posts_at([0, 1, 2, 3])
        assert [(p.pos, p.post_id, p.ext) for p in posts] == [(0, 10, "jpg"), (1, 20, "webp"), (2, 30, "png"),
                                                              (3, 40, "jpeg")]  # post-id order, first of a duplicate
        assert posts[0] == Post(0, 10, "jpg", f"{10:032x}", 8, 6, 100, "g", 2)
        assert [p.post_id for p in index.posts_at([3, 0, 2])] == [40, 10, 30]  # in the order asked
        assert index.post(30).pos == 2 and index.post(31) is None
        with pytest.raises(IndexError):
            index.posts_at([4])


def test_yearly_jsonl_dump_with_string_values_gzipped(tmp_path: Path) -> None:
    lines = [
        {"id": "5", "md5": "a" * 32, "file_ext": "jpg", "image_width": "800", "image_height": "600",
         "file_size": "12345", "rating": "s", "is_deleted": "false",
         "tags": [{"id": "1", "name": "1girl", "category": "0"}, {"id": "2", "name": "miku", "category": "4"}]},
        {"id": "6", "md5": "b" * 32, "file_ext": "gif", "tags": []},
        {"id": "4", "md5": "", "file_ext": "png", "tags": []},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\nnot json\n\n"
    with gzip.open(tmp_path / "2019.jsonl.gz", "wt") as handle:
        handle.write(text)
    report = build_from_dump(tmp_path / "2019.jsonl.gz", tmp_path / "i.db")
    assert (report.rows, report.skipped) == (1, {"bad record": 1, "file type gif": 1, "hidden (no file)": 1})
    with Index(tmp_path / "i.db") as index:
        assert index.posts_at([0]) == [Post(0, 5, "jpg", "a" * 32, 800, 600, 12345, "s", 2)]


def test_json_list_is_read_incrementally_across_read_boundaries() -> None:
    items = [{"id": i, "s": "x]}" * i, "n": 12345678} for i in range(30)] + [123456, [1, 2]]
    text = " [\n " + " ,\n".join(json.dumps(x) for x in items) + "\n]\n"
    for size in (1, 3, 7, 64):
        assert list(_json_list_items(io.StringIO(text), read_size=size)) == items
    with pytest.raises(ValueError, match="truncated"):
        list(_json_list_items(io.StringIO(text[: text.rindex("]")]), read_size=5))
    with pytest.raises(ValueError, match="bad JSON"):
        list(_json_list_items(io.StringIO('[{"id": 1}, {"id": oops}]'), read_size=4))


def test_a_failed_build_leaves_the_old_index(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_text(json.dumps([files.api_post(1)]))
    build_from_dump(tmp_path / "good.json", tmp_path / "index.db")
    (tmp_path / "cut.json").write_text(json.dumps([files.api_post(i) for i in range(5)])[:-40])
    with pytest.raises(ValueError):
        build_from_dump(tmp_path / "cut.json", tmp_path / "index.db")
    assert len(Index(tmp_path / "index.db")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.json", "good.json", "index.db"]  # no temp files


def test_folder_of_pairs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    png = files.solid("PNG")
    files.write_pair(src, 3, png)
    (src / "1.JPG").write_bytes(files.solid("JPEG"))
    (src / "1.JPG.json").write_text(json.dumps(files.api_post(1, ext="jpg")))  # gallery-dl sidecar naming
    files.write_pair(src, 2, b"GIF89a...", ext="gif")
    files.write_pair(src, 4, png)
    (src / "4.jpg").write_bytes(png)  # 4.png and 4.jpg: which one would 4.json describe?
    files.write_pair(src, 5, png)
    (src / "5.json").unlink()
    (src / "6.json").write_text("{}")
    (src / "cat.png").write_bytes(png)
    (src / "cat.json").write_text("{}")
    (src / ".7.png.123.tmp").write_bytes(png)
    (src / "notes.txt").write_text("hello")
    report = build_from_folder(src, tmp_path / "index.db")
    assert report.skipped == {"duplicate post id": 2, "file type gif": 1, "name is not a post id": 1,
                              "no image": 1, "no json": 1}
    with Index(tmp_path / "index.db") as index:
        posts = index.posts_at(range(len(index)))
        assert [(p.post_id, p.ext) for p in posts] == [(1, "JPG"), (3, "png")]
        assert posts[1].md5 == files.api_post(3, image=png)["md5"] and posts[1].file_size == len(png)
        assert index.meta["source"] == str(src.resolve())


def test_not_an_index(tmp_path: Path) -> None:
    (tmp_path / "x.db").write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match="not an sdswarm index"):
        Index(tmp_path / "x.db")
    with pytest.raises(FileNotFoundError, match="index build"):
        Index(tmp_path / "missing.db")
    db = sqlite3.connect(tmp_path / "old.db")
    db.executescript("CREATE TABLE meta (key TEXT, value TEXT); INSERT INTO meta VALUES ('version', '0');")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="version 0"):
        Index(tmp_path / "old.db")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(p) for p in api_dump()[:6]))
    assert main(["index", "build", "--from-dump", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "i.db")]) == 0
    assert "4 posts indexed; skipped: 1 file type gif, 1 file type mp4" in capsys.readouterr().out
    assert main(["index", "build", "--from-folder", str(tmp_path / "nope"), "--out", str(tmp_path / "j.db")]) == 2
    assert "error:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["index", "build", "--from-folder", "a", "--from-dump", "b", "--out", "c"])


def test_many_rows_open_and_draw_fast_with_flat_memory(tmp_path: Path) -> None:
    # 200k rows here; bench/data_pipeline.py measures 5 million.
    n = 200_000
    rows = ((i * 3 + 1, "jpg", None, 512, 768, 100_000, "g", 20) for i in range(n))
    _write_index(tmp_path / "big.db", rows, Counter(), source="generated")
    tracemalloc.start()
    start = time.perf_counter()
    with Index(tmp_path / "big.db") as index:
        plan = ShardPlan(seed=42, size=len(index), images_per_chunk=1000, shards=32)
        posts = index.posts_at(plan.chunk(17, 5))
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 800 < len(posts) <= 1000 and len({p.post_id for p in posts}) == len(posts)
    assert elapsed < 0.5, elapsed
    assert peak < 5e6, peak  # a chunk's worth, not the table
