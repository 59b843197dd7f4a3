"""The how-to's set-up with real peers on 127.0.0.1: an HTTP bucket laid out as its danbooru bucket and its
SQLite index on the mother's disk only. A joiner needs nothing but the relay's address."""

from __future__ import annotations

import re

import pytest

from tests.howto_bucket import howto_bucket, howto_index
from tests.swarm.peers import Peer

pytestmark = pytest.mark.swarm

INDEX_LINE = re.compile(r"index \S+: sha256 ([0-9a-f]{64})")


def test_a_joiner_downloads_the_index_from_its_relay_and_a_joiner_with_another_is_refused(tmp_path):
    started: list[Peer] = []
    with howto_bucket(tmp_path / "bucket", 96) as (bucket, template, index):
        try:
            mother = Peer("mother", tmp_path, max_steps=400, **{
                "data.source": template, "data.index": str(index), "swarm.min_peers": 2, "train.max_swarm_steps": 3})
            started.append(mother.start())
            mother.wait_until(lambda: "others join this swarm with" in mother.log(), "the relay came up", timeout=300)
            joiner = Peer("joiner", tmp_path, join=mother.address, max_steps=400)
            other = howto_index(tmp_path / "other.db", range(1, 49))  # half the posts: another shard plan
            stranger = Peer("stranger", tmp_path, join=mother.address, **{"data.index": str(other)})
            started += [joiner.start(), stranger.start()]

            assert stranger.wait_exit(timeout=300) == 2, stranger.log()[-3000:]
            for peer in (mother, joiner):
                assert peer.wait_exit(timeout=400) == 0, peer.log()[-4000:]
        finally:
            for peer in started:
                peer.kill()

    (swarm_hash,) = set(INDEX_LINE.findall(mother.log()))
    assert INDEX_LINE.findall(joiner.log()) == [swarm_hash]  # both train on the same index
    assert f"downloaded the swarm's index {swarm_hash[:12]} from http://{mother.address}" in joiner.log()
    assert not (joiner.out / "index.db").exists()  # it had no data file of its own
    assert f"files from Bucket('{bucket.url}/" in joiner.log()  # and fetched the pairs from the bucket itself
    # the refused joiner names both hashes, and started nothing
    assert swarm_hash in stranger.log() and "another index gives another shard plan" in stranger.log()
    assert "web UI" not in stranger.log()
    for peer in (mother, joiner):
        assert "the swarm reached swarm step 3 (train.max_swarm_steps)" in peer.log(), f"{peer.name} stopped elsewhere"
    # no two peers trained the same posts in the same round
    slots = [dict(re.findall(r"round (\d+) \(slot (\d+)\)", peer.log())) for peer in (mother, joiner)]
    shared_rounds = set(slots[0]) & set(slots[1])
    assert shared_rounds and all(slots[0][r] != slots[1][r] for r in shared_rounds), slots
