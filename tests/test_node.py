import logging
from unittest import mock

from sdswarm import node
from sdswarm.config import load_config
from sdswarm.swarm.telemetry import PeerMetrics
from sdswarm.train.loop import Progress
from tests.conftest import ROOT


def swarm_with(slots: dict[str, int | None]) -> list[PeerMetrics]:
    return [PeerMetrics(peer_id=peer, role="relay", data_slot=slot) for peer, slot in slots.items()]


def test_a_peer_takes_a_free_data_slot_and_says_so_when_none_is_left(caplog):
    config = load_config(ROOT / "configs" / "tiny.yaml", {"data.shards": 3})
    with mock.patch.object(node, "read_peers", return_value=swarm_with({"a": 0, "b": 1, "me": None})):
        assert node.choose_data_slot(None, config, "me", None) == 2  # "me" in the view is this peer itself
    with caplog.at_level(logging.WARNING), \
            mock.patch.object(node, "read_peers", return_value=swarm_with({"a": 0, "b": 1, "c": 2})):
        shared = node.choose_data_slot(None, config, "me", None)
    assert shared in (0, 1, 2) and "more peers than data.shards (3)" in caplog.text


def test_a_dht_that_cannot_be_read_keeps_the_current_slot(caplog):
    config = load_config(ROOT / "configs" / "tiny.yaml")
    with mock.patch.object(node, "read_peers", side_effect=TimeoutError("no answer")):
        assert node.choose_data_slot(None, config, "me", 2) == 2
    assert "could not read the swarm's data slots" in caplog.text


def test_a_stopped_node_publishes_no_throughput():
    progress = Progress(step=40, samples_per_second=9.0)
    training = node.peer_metrics(progress, "me", "relay", None, 1, "training")
    stopped = node.peer_metrics(progress, "me", "relay", None, 1, "stopped")
    assert training.samples_per_second == 9.0
    assert (stopped.state, stopped.samples_per_second) == ("stopped", 0.0)
