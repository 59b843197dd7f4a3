import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

import sdswarm
from sdswarm.data.workdir import list_pairs, materialize_folder


def image_bytes(fmt: str, colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, format=fmt)
    return buf.getvalue()


def write_post(folder: Path, name: str, general: str, fmt: str = "PNG", json_name: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(image_bytes(fmt))
    stem = name.rsplit(".", 1)[0]
    post = {
        "id": 1,
        "tag_string_general": general,
        "tag_string_artist": "someone",
        "tag_string_meta": "highres",
    }
    (folder / (json_name or f"{stem}.json")).write_text(json.dumps(post))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_post(src, "1.png", "red_circle 1shape")
    write_post(src, "2.JPG", "blue_square ^_^", fmt="JPEG")
    write_post(src, "3.webp", "star", fmt="WEBP")
    write_post(src, "4.jpeg", "yellow_background", fmt="JPEG", json_name="4.jpeg.json")  # gallery-dl naming
    write_post(src, "5.png", "")  # only artist/meta tags -> nothing to caption
    (src / "6.png").write_bytes(image_bytes("PNG"))  # no json
    (src / "7.json").write_text(json.dumps({"tag_string_general": "lonely"}))  # no image
    (src / "8.json").write_text("{}")  # no image either
    (src / "9.png").write_bytes(image_bytes("PNG"))
    (src / "9.json").write_text('{"tag_string_general": "trunc')  # bad json
    (src / "notes.txt").write_text("not a post")
    return src


EXPECTED = [("1", ".png", "red circle, 1shape"), ("2", ".jpg", "blue square, ^_^"), ("3", ".webp", "star"),
            ("4", ".jpeg", "yellow background")]  # fmt: skip
DISCARDED = {"bad json": 1, "empty caption": 1, "no image": 2, "no json": 1}


def test_materialize_keeps_good_pairs_and_counts_the_rest(source: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    report = materialize_folder(source, work)
    assert (report.written, report.skipped_existing, report.discarded) == (4, 0, DISCARDED)

    pairs = list_pairs(work)
    assert [(p.image.stem, p.image.suffix, p.caption) for p in pairs] == EXPECTED
    for p in pairs:
        src_name = {"1": "1.png", "2": "2.JPG", "3": "3.webp", "4": "4.jpeg"}[p.image.stem]
        assert p.image.read_bytes() == (source / src_name).read_bytes()
        Image.open(p.image).verify()
    assert sorted(f.name for f in work.iterdir()) == sorted(
        [f"{s}{e}" for s, e, _ in EXPECTED] + [f"{s}.txt" for s, _, _ in EXPECTED]
    )  # discarded posts leave nothing, and no temp files are left behind


def test_second_run_skips_existing_and_resumes_missing(source: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    materialize_folder(source, work)
    again = materialize_folder(source, work)
    assert (again.written, again.skipped_existing, again.discarded) == (0, 4, DISCARDED)

    (work / "3.txt").unlink()  # as if the run died between the image and its caption
    resumed = materialize_folder(source, work)
    assert (resumed.written, resumed.skipped_existing) == (1, 3)
    assert [p.caption for p in list_pairs(work)] == [c for _, _, c in EXPECTED]


def test_leftover_temp_files_and_captionless_images_are_not_pairs(source: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    materialize_folder(source, work)
    (work / ".10.png.4242.tmp").write_bytes(image_bytes("PNG")[:20])  # partial copy from a crashed run
    (work / ".10.txt.4242.tmp").write_text("half a capt")
    (work / "11.png").write_bytes(image_bytes("PNG"))  # image placed, caption never written
    (work / "12.txt").write_text("caption without image")
    assert [p.image.stem for p in list_pairs(work)] == ["1", "2", "3", "4"]


def test_killed_mid_run_leaves_no_partial_real_file_and_next_run_finishes(
    source: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    # Die (no cleanup, like SIGKILL) right before the first caption would be moved into place.
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from sdswarm.data.workdir import materialize_folder
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith(".txt"):
                os._exit(3)
            real_replace(src, dst)
        os.replace = replace
        materialize_folder(Path({str(source)!r}), Path({str(work)!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(sdswarm.__file__).parents[1])}
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == 3
    names = {f.name for f in work.iterdir()}
    assert "1.png" in names and "1.txt" not in names
    assert any(n.startswith(".1.txt.") and n.endswith(".tmp") for n in names)  # the partial is a temp name
    assert list_pairs(work) == []

    report = materialize_folder(source, work)
    assert (report.written, report.skipped_existing) == (4, 0)
    assert [p.caption for p in list_pairs(work)] == [c for _, _, c in EXPECTED]


def test_copies_when_hardlinks_are_impossible(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(*args: object, **kwargs: object) -> None:
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    work = tmp_path / "work"
    assert materialize_folder(source, work).written == 4
    assert (work / "1.png").read_bytes() == (source / "1.png").read_bytes()
    assert (work / "1.png").stat().st_nlink == 1


def test_categories_and_duplicate_stems(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_post(src, "1.png", "circle")
    (src / "1.jpg").write_bytes(image_bytes("JPEG"))  # same stem: one 1.txt cannot caption both
    report = materialize_folder(src, tmp_path / "work", categories=("artist", "general"))
    assert (report.written, report.discarded) == (1, {"duplicate stem": 1})
    assert list_pairs(tmp_path / "work")[0].caption == "someone, circle"
    with pytest.raises(ValueError, match="unknown tag categories"):
        materialize_folder(src, tmp_path / "work2", categories=("general", "tags"))
