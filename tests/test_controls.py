"""What a node tells its UI: the metrics history, read as the trainer appends to it."""

from __future__ import annotations

import json

from sdswarm.controls import MetricsHistory


def append(path, *records, tail: str = "") -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_history_keeps_the_newest_records_and_waits_for_whole_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    history = MetricsHistory(path, keep=3)
    assert history.read() == []  # no metrics yet
    append(path, {"step": 1}, {"step": 2}, tail='{"step": 3, "lo')  # the trainer is mid-write
    assert history.read() == [{"step": 1}, {"step": 2}]
    append(path, tail='ss": 0.5}\n')
    append(path, {"step": 4}, tail="not json\n")
    assert history.read() == [{"step": 2}, {"step": 3, "loss": 0.5}, {"step": 4}]  # a broken line passed over


def test_each_poll_reads_only_what_was_appended(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append(path, *({"step": s} for s in range(10, 20)))
    history = MetricsHistory(path)
    assert [r["step"] for r in history.read()] == list(range(10, 20))
    # the bytes already read are not read again: rewritten in place, they do not change the history
    path.write_bytes(path.read_bytes().replace(b'"step": 1', b'"step": 9'))
    append(path, {"step": 20})
    assert [r["step"] for r in history.read()] == list(range(10, 21))


def test_a_new_file_in_its_place_starts_the_history_over(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append(path, {"step": 1}, {"step": 2})
    history = MetricsHistory(path)
    assert len(history.read()) == 2
    path.write_text(json.dumps({"step": 1}) + "\n")  # another run started in this folder
    assert history.read() == [{"step": 1}]
