"""The peers a node remembers, and rejoining through them (DHTs only, on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from sdswarm.swarm import telemetry
from sdswarm.swarm.network import (
    PEERS_FILE,
    _connected_addresses,
    connected_peer_addresses,
    remember_peers,
    remembered_peers,
    start_dht,
    start_dht_rejoining,
    stop_dht,
)

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def test_the_peers_file_round_trips_and_ignores_junk(tmp_path):
    remember_peers(tmp_path, ["1.2.3.4:80", "/ip4/1.2.3.4/tcp/5/p2p/Qm", "1.2.3.4:80", "bad\nline", ""])
    assert remembered_peers(tmp_path) == ["1.2.3.4:80", "/ip4/1.2.3.4/tcp/5/p2p/Qm"]
    assert [p.name for p in tmp_path.iterdir()] == [PEERS_FILE]  # no temp file left beside it
    assert remembered_peers(tmp_path / "nowhere") == []


def test_a_restart_rejoins_through_remembered_addresses_or_starts_alone_saying_so(caplog):
    caplog.set_level(logging.INFO)
    first = start_dht(initial_peers=[], host_maddrs=LOOPBACK)
    second = start_dht(initial_peers=[str(a) for a in first.get_visible_maddrs()], host_maddrs=LOOPBACK)
    started = [first, second]
    try:
        known = connected_peer_addresses(second)
        assert known and all(f"/p2p/{first.peer_id}" in a for a in known)
        # a relay that is gone is skipped; the remembered DHT address works
        back = start_dht_rejoining(["127.0.0.1:1", *known], host_maddrs=LOOPBACK)
        started.append(back)
        assert "rejoined the swarm through" in caplog.text
        assert any(str(first.peer_id) in a for a in connected_peer_addresses(back))
        alone = start_dht_rejoining([f"/ip4/127.0.0.1/tcp/1/p2p/{first.peer_id}"], host_maddrs=LOOPBACK)
        started.append(alone)
        assert "starting alone: no peer this node knew answers" in caplog.text
    finally:
        for dht in started:
            stop_dht(dht)


class LostCalls:
    """A DHT whose calls never answer, as hivemind's did when it lost a call's task around a peer's restart."""

    def __init__(self) -> None:
        self.stores = 0

    def run_coroutine(self, coro, return_future: bool = False) -> Future:
        assert return_future, "waiting for the answer itself would block forever"
        return Future()

    def store(self, *args, return_future: bool = False, **kwargs) -> Future:
        assert return_future, "waiting for the answer itself would block forever"
        self.stores += 1
        return Future()


def test_a_call_the_dht_never_answers_does_not_stop_the_telemetry(monkeypatch):
    started = time.monotonic()
    assert connected_peer_addresses(LostCalls(), timeout=0.2) == []
    # the publisher gives up on a lost publication and publishes again, instead of waiting for it forever
    monkeypatch.setattr(telemetry, "DHT_TIMEOUT", 0.2)
    dht = LostCalls()
    publisher = telemetry.Publisher(dht, "run", lambda: telemetry.PeerMetrics(peer_id="me", role="relay"), b"me",
                                    period=0.05)
    publisher.start()
    deadline = time.monotonic() + 10
    while dht.stores < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    publisher.stop()
    assert dht.stores >= 3 and time.monotonic() - started < 10


def test_listing_the_connections_in_the_dht_process_survives_the_collector_and_gives_up_in_time():
    class Node:  # the DHT process's node, whose p2p daemon answers late, or never
        def __init__(self) -> None:
            self.p2p, self.answers = self, []

        def list_peers(self) -> asyncio.Future:
            answer = asyncio.get_running_loop().create_future()
            self.answers.append(weakref.ref(answer))
            return answer

    async def main() -> None:
        node = Node()
        listing = weakref.ref(asyncio.create_task(_connected_addresses(None, node, timeout=30)))
        await asyncio.sleep(0)
        gc.collect()  # hivemind keeps no reference to the task: only the listing's own wait holds it
        task = listing()
        assert task is not None, "the listing was destroyed mid-wait"
        node.answers[0]().set_result([SimpleNamespace(peer_id="QmPeer", addrs=["/ip4/127.0.0.1/tcp/5"])])
        assert await task == ["/ip4/127.0.0.1/tcp/5/p2p/QmPeer"]
        with pytest.raises(asyncio.TimeoutError):  # a daemon that never answers holds nothing for ever
            await _connected_addresses(None, Node(), timeout=0.1)

    asyncio.run(main())
