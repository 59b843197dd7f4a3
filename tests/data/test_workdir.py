import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import sdswarm
from sdswarm.data.workdir import WorkDir, list_pairs
from tests.data import files

PNG = files.solid("PNG")


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_pairs_land_side_by_side_and_are_reused_after_a_restart(tmp_path: Path) -> None:
    work = WorkDir(tmp_path, max_bytes=10**6, caption_key="k")
    pair = work.put(12, "JPG", PNG, "red circle, 1shape")
    assert pair.image == tmp_path / "12.jpg" and pair.image.read_bytes() == PNG
    assert (tmp_path / "12.txt").read_text() == "red circle, 1shape"
    assert names(tmp_path) == {"12.jpg", "12.txt", ".captions.json"}  # no temp files left
    again = WorkDir(tmp_path, max_bytes=10**6, caption_key="k")
    assert len(again) == 1 and again.bytes == len(PNG)
    assert again.get(12).caption == "red circle, 1shape" and again.get(13) is None
    assert [(p.image.name, p.caption) for p in list_pairs(tmp_path)] == [("12.jpg", "red circle, 1shape")]


def test_bounded_cache_evicts_the_least_recently_used_but_never_what_is_pinned(tmp_path: Path) -> None:
    work = WorkDir(tmp_path, max_bytes=3 * len(PNG))
    for post_id in range(5):
        work.put(post_id, "png", PNG, f"tag{post_id}")
        time.sleep(0.01)  # distinct mtimes: the use order must survive a restart
    work.get(0)  # used again: now the most recent
    assert work.evict(keep={1}) == 2
    assert sorted(p.image.stem for p in list_pairs(tmp_path)) == ["0", "1", "4"]
    assert work.bytes == 3 * len(PNG)
    # pinned pairs may hold the cache over its bound; it says so and keeps them
    work.put(5, "png", PNG, "tag5")
    assert work.evict(keep={0, 1, 4, 5}) == 0 and len(work) == 4
    # after a restart the order is still known: 1 (oldest) goes first
    restarted = WorkDir(tmp_path, max_bytes=3 * len(PNG))
    assert restarted.evict() == 1 and 1 not in restarted and 0 in restarted


def test_interrupted_materialisation_leaves_no_partial_pair(tmp_path: Path) -> None:
    work = tmp_path / "work"
    # Die (no cleanup, like SIGKILL) right before the caption would be moved into place.
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from sdswarm.data.workdir import WorkDir
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith("2.txt"):
                os._exit(3)
            real_replace(src, dst)
        os.replace = replace
        work = WorkDir(Path({str(work)!r}), max_bytes=10**6)
        work.put(1, "png", {PNG!r}, "first")
        work.put(2, "png", {PNG!r}, "second")
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(sdswarm.__file__).parents[1])}
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == 3
    left = names(work)
    assert {"1.png", "1.txt", "2.png"} <= left and "2.txt" not in left
    assert any(n.startswith(".2.txt.") and n.endswith(".tmp") for n in left)  # the partial is a temp name
    assert [p.image.name for p in list_pairs(work)] == ["1.png"]  # a pair exists only with its caption

    reopened = WorkDir(work, max_bytes=10**6)
    assert names(work) == {"1.png", "1.txt", ".captions.json"}  # the orphan image and the temp file are gone
    assert len(reopened) == 1 and reopened.get(1).caption == "first"


def test_temp_files_of_a_live_process_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / f".3.png.{os.getpid()}.tmp").write_bytes(b"being written")
    (tmp_path / ".3.png.999999999.tmp").write_bytes(b"dead")
    WorkDir(tmp_path, max_bytes=100)
    assert names(tmp_path) == {f".3.png.{os.getpid()}.tmp", ".captions.json"}


def test_other_caption_settings_drop_the_cached_pairs(tmp_path: Path) -> None:
    WorkDir(tmp_path, max_bytes=10**6, caption_key="general").put(1, "png", PNG, "circle")
    assert len(WorkDir(tmp_path, max_bytes=10**6, caption_key="general")) == 1
    changed = WorkDir(tmp_path, max_bytes=10**6, caption_key="artist, general")
    assert len(changed) == 0 and names(tmp_path) == {".captions.json"}


def test_a_folder_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    (tmp_path / "holiday.jpg").write_bytes(PNG)
    with pytest.raises(ValueError, match="not sdswarm pairs"):
        WorkDir(tmp_path, max_bytes=100)
    assert (tmp_path / "holiday.jpg").exists()
    old = tmp_path / "old"  # a work dir from before the cache marker: adopted
    old.mkdir()
    (old / "4.png").write_bytes(PNG)
    (old / "4.txt").write_text("star")
    assert WorkDir(old, max_bytes=10**6).get(4).caption == "star"


def test_a_pair_deleted_behind_our_back_is_forgotten(tmp_path: Path) -> None:
    work = WorkDir(tmp_path, max_bytes=10**6)
    work.put(1, "png", PNG, "x")
    (tmp_path / "1.txt").unlink()
    assert work.get(1) is None and len(work) == 0 and work.bytes == 0


def test_list_pairs_ignores_temp_files_and_half_pairs(tmp_path: Path) -> None:
    WorkDir(tmp_path, max_bytes=10**6).put(1, "png", PNG, "a")
    (tmp_path / ".10.png.4242.tmp").write_bytes(PNG[:20])
    (tmp_path / "11.png").write_bytes(PNG)  # image placed, caption never written
    (tmp_path / "12.txt").write_text("caption without image")
    assert [p.image.stem for p in list_pairs(tmp_path)] == ["1"]
