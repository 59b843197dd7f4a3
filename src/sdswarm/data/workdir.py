"""Materialise Danbooru image + JSON pairs into a work directory of image + caption .txt pairs.

Crash safety: every file is written under a temp name (``.<name>.<pid>.tmp``, never an image or .txt
suffix) and moved into place with os.replace; the caption .txt is written after its image, so a pair exists
exactly when its .txt does. This guards against the process dying, not against power loss (no fsync).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdswarm.data.captions import DEFAULT_CATEGORIES, caption_from_post, check_categories

IMAGE_EXTS = (".jpg", ".jpeg", ".webp", ".png")


@dataclass
class Pair:
    """One trainable example on disk."""

    image: Path
    caption: str


@dataclass
class MaterializeReport:
    written: int = 0
    skipped_existing: int = 0
    discarded: dict[str, int] = field(default_factory=dict)  # reason -> count


def _tmp_name(workdir: Path, name: str) -> Path:
    # Leading dot + .tmp suffix: never mistaken for an image or caption; pid keeps concurrent runs apart.
    return workdir / f".{name}.{os.getpid()}.tmp"


def _place_image(src: Path, dst: Path) -> None:
    tmp = _tmp_name(dst.parent, dst.name)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)  # free and instant on the same file system
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _place_text(text: str, dst: Path) -> None:
    tmp = _tmp_name(dst.parent, dst.name)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _visible_files(folder: Path) -> list[Path]:
    # Dotfiles are skipped: our temp files, and macOS "._x.jpg" resource forks that look like images.
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def materialize_folder(
    source: Path, workdir: Path, categories: Sequence[str] = DEFAULT_CATEGORIES
) -> MaterializeReport:
    """Turn each ``{stem}.<img>`` + ``{stem}.json`` in `source` (not recursive) into ``{stem}.<img>`` +
    ``{stem}.txt`` in `workdir`; image extensions are matched case-insensitively and written lower-case.

    gallery-dl's ``{stem}.<img>.json`` sidecar name is accepted too. Discard reasons: "no json", "no image",
    "bad json" (unreadable, not JSON, or not a post shape captions understand), "empty caption",
    "empty image" (0 bytes), "duplicate stem" (e.g. 1.jpg and 1.png: one .txt can serve only one).
    Pairs whose .txt is already in `workdir` are skipped without reading their JSON (resumable; a change of
    `categories` therefore needs a fresh workdir).
    """
    source, workdir = Path(source), Path(workdir)
    check_categories(categories)  # fail once, loudly, rather than discarding every post
    if not source.is_dir():
        raise NotADirectoryError(f"source folder {source} does not exist")
    workdir.mkdir(parents=True, exist_ok=True)

    images: list[Path] = []
    jsons: dict[str, Path] = {}  # sidecar key (name without .json) -> path
    for p in _visible_files(source):
        ext = p.suffix.lower()
        if ext in IMAGE_EXTS:
            images.append(p)
        elif ext == ".json":
            jsons[p.name[: -len(".json")]] = p

    report = MaterializeReport()
    discarded: Counter[str] = Counter()
    claimed: set[str] = set()
    seen_stems: set[str] = set()
    for img in images:
        keys = [k for k in (img.stem, img.name) if k in jsons]
        claimed.update(keys)
        if img.stem in seen_stems:
            discarded["duplicate stem"] += 1
            continue
        seen_stems.add(img.stem)
        if not keys:
            discarded["no json"] += 1
            continue
        dst_img = workdir / f"{img.stem}{img.suffix.lower()}"
        dst_txt = workdir / f"{img.stem}.txt"
        if dst_txt.is_file() and dst_img.is_file():
            report.skipped_existing += 1
            continue
        if img.stat().st_size == 0:
            discarded["empty image"] += 1
            continue
        try:
            post = json.loads(jsons[keys[0]].read_text(encoding="utf-8-sig"))  # -sig: tolerate a BOM
            caption = caption_from_post(post, categories)
        except (OSError, UnicodeDecodeError, ValueError):  # JSONDecodeError is a ValueError
            discarded["bad json"] += 1
            continue
        if not caption:
            discarded["empty caption"] += 1
            continue
        _place_image(img, dst_img)
        _place_text(caption, dst_txt)  # last: its presence marks the pair complete
        report.written += 1
    unclaimed = len(jsons.keys() - claimed)
    if unclaimed:
        discarded["no image"] += unclaimed
    report.discarded = dict(sorted(discarded.items()))
    return report


def list_pairs(workdir: Path) -> list[Pair]:
    """The complete pairs in `workdir` (image + .txt present), sorted by stem; temp files are ignored."""
    pairs: dict[str, Pair] = {}
    for p in _visible_files(Path(workdir)):
        if p.suffix.lower() not in IMAGE_EXTS or p.stem in pairs:
            continue
        txt = p.with_suffix(".txt")
        if txt.is_file():
            pairs[p.stem] = Pair(p, txt.read_text(encoding="utf-8").strip())
    return [pairs[s] for s in sorted(pairs)]
