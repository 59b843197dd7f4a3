"""The I.E endpoints: a relay serves only the public training config; a joiner refuses what it cannot use."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sdswarm.config import load_config
from sdswarm.swarm.exchange import (
    CONFIG_PATH,
    PEERS_PATH,
    PROTOCOL,
    ExchangeError,
    config_answer,
    fetch_join_info,
    peers_answer,
)
from sdswarm.web.server import HttpServer, exchange_routes
from tests.conftest import ROOT

PEERS = ["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWFakePeer"]
DEMO = {"model": "builtin:tiny", "data": {"source": "builtin:demo"}}


@pytest.fixture
def relay_config(tmp_path):
    return load_config(ROOT / "configs" / "sd_1-5.yaml", {
        "output.dir": str(tmp_path / "secret-output"), "data.workdir": str(tmp_path / "secret-workdir"),
        "data.source": "https://bucket.example/{post_id}.{ext}", "train.device": "cpu",
    })


@pytest.fixture
def relay(relay_config):
    server = HttpServer(exchange_routes(lambda: config_answer(relay_config), lambda: peers_answer(PEERS),
                                       lambda: {"protocol": PROTOCOL, "peers": []}), "127.0.0.1", 0)
    port = server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


def test_joiner_gets_the_swarm_config_and_peers(relay, relay_config, tmp_path):
    info = fetch_join_info(relay, {"output.dir": str(tmp_path / "mine")})
    assert info.peers == PEERS
    swarm_keys = ("model", "lr", "seed", "extended_chunks", "clip_penultimate", "resolution", "swarm", "ucg")
    for key in swarm_keys:
        assert getattr(info.config, key) == getattr(relay_config, key)
    assert info.config.data.source == relay_config.data.source
    assert str(info.config.output.dir) == str(tmp_path / "mine")  # its own, never the relay's


def test_the_config_answer_holds_no_local_path_or_secret(relay_config, tmp_path):
    text = json.dumps(config_answer(relay_config))
    assert str(tmp_path) not in text and "secret" not in text
    assert '"device"' not in text and '"workdir"' not in text and '"output"' not in text
    # a folder on the mother's disk is not served either: it would mean nothing elsewhere
    local = relay_config.model_copy(update={"data": relay_config.data.model_copy(update={"source": str(tmp_path)})})
    assert str(tmp_path) not in json.dumps(config_answer(local))


def test_the_index_is_named_by_its_hash_and_no_local_path_leaks(relay_config, tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    data = relay_config.data.model_copy(update={"index": str(tmp_path / "danbooru.db"),
                                                "json_source": str(tmp_path / "json" / "{post_id}.json")})
    local = relay_config.model_copy(update={"data": data, "model": str(model_dir)})
    answer = config_answer(local, "ab" * 32)
    assert str(tmp_path) not in json.dumps(answer)
    assert answer["config"]["data"]["index_sha256"] == "ab" * 32 and "index" not in answer["config"]["data"]
    with serving({CONFIG_PATH: answer, PEERS_PATH: peers_answer(PEERS)}) as address:
        with pytest.raises(ExchangeError, match="--set model=DIR"):
            fetch_join_info(address)
        info = fetch_join_info(address, {"model": str(tmp_path / "my-copy")})
        assert info.config.model == str(tmp_path / "my-copy") and info.config.data.index_sha256 == "ab" * 32
        assert info.config.data.index is None  # the joiner downloads the swarm's index from its relay
    with serving({CONFIG_PATH: config_answer(relay_config), PEERS_PATH: peers_answer(PEERS)}) as address, \
            pytest.raises(ExchangeError, match="a joiner cannot choose another model"):
        fetch_join_info(address, {"model": "someone/else"})


def test_a_folder_source_needs_the_joiners_own_copy(relay_config, tmp_path):
    local = relay_config.model_copy(update={"data": relay_config.data.model_copy(update={"source": str(tmp_path)})})
    with serving({CONFIG_PATH: config_answer(local), PEERS_PATH: peers_answer(PEERS)}) as address:
        with pytest.raises(ExchangeError, match="--set data.source=DIR"):
            fetch_join_info(address)
        info = fetch_join_info(address, {"data.source": str(tmp_path / "my-copy")})
        assert info.config.data.source == str(tmp_path / "my-copy")


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ({CONFIG_PATH: {"protocol": 99, "version": "9.0", "config": {}}}, r"protocol 99, this node speaks 2"),
        ({CONFIG_PATH: {"protocol": PROTOCOL, "config": {"lr": "fast", **DEMO}}}, r"key 'lr': value 'fast'"),
        ({CONFIG_PATH: {"protocol": PROTOCOL, "config": {"evil": 1, **DEMO}}}, r"unknown key 'evil'"),
        ({CONFIG_PATH: "<html>not json</html>"}, r"not JSON"),
        ({CONFIG_PATH: {"protocol": PROTOCOL}}, r"sent no training config"),
        ({PEERS_PATH: {"protocol": PROTOCOL, "peers": ["http://evil"]}}, r"no usable DHT addresses"),
        ({CONFIG_PATH: 404}, r"HTTP 404"),
    ],
)
def test_a_bad_relay_answer_is_refused_with_a_clear_message(answers, message):
    good = {CONFIG_PATH: {"protocol": PROTOCOL, "config": {**DEMO}},
            PEERS_PATH: peers_answer(PEERS)}
    with serving({**good, **answers}) as address, pytest.raises(ExchangeError, match=message):
        fetch_join_info(address)


def test_an_unreachable_relay_is_named():
    with serving({}) as address:
        pass  # the server is gone now
    with pytest.raises(ExchangeError, match=f"cannot reach the relay at http://{address}"):
        fetch_join_info(address, timeout=3)


class serving:
    """A stand-in relay on 127.0.0.1 answering fixed bodies (dicts as JSON, strings raw, ints as a status)."""

    def __init__(self, answers: dict) -> None:
        answers_ = answers

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                answer = answers_.get(self.path, 404)
                status = answer if isinstance(answer, int) else 200
                body = b"" if isinstance(answer, int) else (
                    answer.encode() if isinstance(answer, str) else json.dumps(answer).encode())
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
