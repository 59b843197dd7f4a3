"""Atomic writes: the old content or the new, never half, and no temp files left behind."""

from __future__ import annotations

import os
import stat

import pytest

from sdswarm.atomic import TEMP_NAME, atomic_path, temp_path, write_atomic


def test_a_file_is_replaced_whole_and_a_failed_write_keeps_the_old_one(tmp_path):
    dest = tmp_path / "deep" / "node.yaml"
    write_atomic(dest, b"first")
    write_atomic(dest, b"second", durable=True)
    assert dest.read_bytes() == b"second"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half of a thi")
        raise RuntimeError("the writer died")
    assert dest.read_bytes() == b"second"
    assert os.listdir(dest.parent) == ["node.yaml"]


def test_a_secret_is_never_readable_by_others(tmp_path):
    os.umask(0o022)
    dest = write_atomic(tmp_path / "admin_token", b"secret\n", mode=0o600)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


def test_a_folder_replaces_a_folder_unless_told_to_keep_the_first(tmp_path):
    dest = tmp_path / "step_00000010"
    for content in (b"old", b"new"):
        with atomic_path(dest, durable=True) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_bytes(content)
    assert (dest / "weights").read_bytes() == b"new"
    with atomic_path(dest, replace=False) as tmp:  # another builder got there first: theirs stays
        tmp.mkdir()
        (tmp / "weights").write_bytes(b"late")
    assert (dest / "weights").read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["step_00000010"]


def test_temp_names_are_hidden_distinct_and_name_their_writer(tmp_path):
    first, second = temp_path(tmp_path / "1.png"), temp_path(tmp_path / "1.png")
    assert first != second and first.name.startswith(".1.png.") and first.name.endswith(".tmp")
    match = TEMP_NAME.match(first.name)
    assert match and match.group(1) == "1.png" and int(match.group(2)) == os.getpid()
