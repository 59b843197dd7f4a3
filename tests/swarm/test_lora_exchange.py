"""A LoRA relay names its base model and its mode; a joiner gets both, `sdswarm status` shows the mode; a peer that
reaches the swarm through the DHT alone compares its base with the one the peers publish."""

from __future__ import annotations

import time

import pytest

from sdswarm.cli import main
from sdswarm.config import load_config
from sdswarm.model.lora import BaseIdentity, BaseModelMismatch
from sdswarm.node import check_peer_bases
from sdswarm.swarm.admission import Admission
from sdswarm.swarm.exchange import PROTOCOL, ExchangeError, config_answer, fetch_join_info, peers_answer
from sdswarm.swarm.network import start_dht
from sdswarm.swarm.telemetry import GONE_AFTER, PeerMetrics, publish
from sdswarm.web.server import HttpServer, exchange_routes
from tests.conftest import ROOT

PEERS = ["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWFakePeer"]
BASE = BaseIdentity(model="runwayml/stable-diffusion-v1-5", sha256="0123456789abcdef" * 4)
TRAINING = {"mode": "lora", "rank": 32, "alpha": 32.0, "text_encoder": True, "parameters": 18_874_368,
            "megabytes": 75.5, "base_model": BASE.to_json()}


@pytest.fixture
def lora_config(tmp_path):
    return load_config(ROOT / "configs" / "sd_1-5-lora.yaml", {"output.dir": str(tmp_path / "out")})


def serve(config, base):
    swarm = {"protocol": PROTOCOL, "training": TRAINING, "run_id": "testrun", "epoch": 3, "samples_toward_target": 5,
             "target_batch_size": 75000, "samples_per_second": 1.5, "peers": []}
    server = HttpServer(exchange_routes(lambda: config_answer(config, "ab" * 32, base), lambda: peers_answer(PEERS),
                                        lambda: swarm), "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.start()}"


def test_the_lora_config_is_the_how_tos_plus_the_lora_section(lora_config):
    how_to = load_config(ROOT / "configs" / "sd_1-5.yaml", {"output.dir": str(lora_config.output.dir)})
    assert lora_config.model_copy(update={"train": how_to.train}) == how_to
    lora = lora_config.train.lora
    assert (lora.rank, lora.scale_alpha) == (32, 32.0) and lora_config.train_text_encoder
    assert {"to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"} <= set(lora.target_modules)
    assert set(lora.text_encoder) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def test_a_joiner_gets_the_swarms_base_model_and_status_shows_the_mode(lora_config, tmp_path, capsys):
    server, address = serve(lora_config, BASE)
    try:
        info = fetch_join_info(address, {"output.dir": str(tmp_path / "mine")})
        assert info.base_model == BASE and info.config.train.lora == lora_config.train.lora
        assert main(["status", address]) == 0
    finally:
        server.stop()
    out = capsys.readouterr().out
    assert "training: LoRA rank 32 (alpha 32) on the UNet + text encoder" in out
    assert "18,874,368 parameters, 75.5 MB" in out and "runwayml/stable-diffusion-v1-5" in out


def test_a_lora_relay_that_names_no_base_model_is_refused(lora_config, tmp_path):
    server, address = serve(lora_config, None)
    try:
        with pytest.raises(ExchangeError, match="names its base model"):
            fetch_join_info(address, {"output.dir": str(tmp_path / "mine")})
    finally:
        server.stop()


def test_a_peer_reaching_the_swarm_through_the_dht_refuses_another_base_naming_both(tmp_path):
    started = []

    def peer(name: str, run_id: str, initial_peers=()):
        """A DHT with the node's signed records (an open swarm): a record's peer is its signer."""
        folder = tmp_path / name
        folder.mkdir()
        admission = Admission.for_node(access_mode="open", run_id=run_id, folder=folder,
                                       identity_path=folder / "identity.key", mother=False)
        dht = start_dht(initial_peers=list(initial_peers), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                        identity_path=str(folder / "identity.key"), **admission.dht_options())
        started.append(dht)
        return dht, admission.owner

    def metrics(dht, **fields) -> PeerMetrics:
        return PeerMetrics(peer_id=str(dht.peer_id), role="mother", time=time.time(), **fields)

    other = BaseIdentity(model="my/finetuned-base", sha256="fedcba9876543210" * 4)
    try:
        swarm, owner = peer("mother", "testrun")
        joiner, _ = peer("joiner", "testrun", [str(a) for a in swarm.get_visible_maddrs()])
        publish(swarm, "testrun", metrics(swarm, base_model=BASE.model, base_sha256=BASE.sha256), owner)
        check_peer_bases(joiner, "testrun", str(joiner.peer_id), BASE)  # the same base: trains
        with pytest.raises(BaseModelMismatch) as refused:
            check_peer_bases(joiner, "testrun", str(joiner.peer_id), other)
        message = str(refused.value)
        assert "my/finetuned-base (weights sha256 fedcba9876543210)" in message
        assert "runwayml/stable-diffusion-v1-5 (weights sha256 0123456789abcdef)" in message
        assert str(swarm.peer_id) in message
        # a peer that stopped publishing (gone) no longer speaks for the swarm; nor does a full fine-tune's
        gone, gone_owner = peer("gone", "later")
        full, full_owner = peer("full", "later", [str(a) for a in gone.get_visible_maddrs()])
        later, _ = peer("later", "later", [str(a) for a in gone.get_visible_maddrs()])
        publish(gone, "later", metrics(gone, base_model=BASE.model, base_sha256=BASE.sha256).model_copy(
            update={"time": time.time() - 2 * GONE_AFTER}), gone_owner)
        publish(full, "later", metrics(full).model_copy(update={"role": "relay"}), full_owner)
        check_peer_bases(later, "later", str(later.peer_id), other)
    finally:
        for dht in started:
            dht.shutdown()
