"""What a relay cannot make a joiner do: take its folders, cadences or device, load a local file or reach into its
network, stall it with absurd values, crash it with wrong shapes, or write escape sequences to its terminal."""

from __future__ import annotations

import json
import re

import pytest

from sdswarm.cli import main, status_lines
from sdswarm.hosts import is_public_host
from sdswarm.model.lora import BaseIdentity
from sdswarm.swarm.exchange import (
    CONFIG_PATH,
    PEERS_PATH,
    PROTOCOL,
    SWARM_PATH,
    ExchangeError,
    config_answer,
    fetch_join_info,
    peers_answer,
    public_training,
)
from tests.swarm.test_exchange import DEMO, PEERS, relay_config, serving  # noqa: F401 (relay_config: a fixture)

URL_SOURCE = {"model": "builtin:tiny", "data": {"source": "https://bucket.example/{post_id}.{ext}"}}


def join_through(config: dict, overrides: dict | None = None):
    """fetch_join_info through a stand-in relay on 127.0.0.1 that serves `config`."""
    with serving({CONFIG_PATH: {"protocol": PROTOCOL, "config": config}, PEERS_PATH: peers_answer(PEERS)}) as address:
        return fetch_join_info(address, overrides)


# --- the joiner's own keys ---

@pytest.mark.parametrize(("sent", "key"), [
    ({"output": {"dir": "/tmp/elsewhere"}}, "output"),
    ({"output": {"checkpoint_every": 1, "keep_checkpoints": 1000}}, "output"),
    ({"data": {"source": "builtin:demo", "workdir": "/home/victim/.ssh"}}, "data.workdir"),
    ({"data": {"source": "builtin:demo", "workdir_max_gb": 10000}}, "data.workdir_max_gb"),
    ({"data": {"source": "builtin:demo", "loader_workers": 32}}, "data.loader_workers"),
    ({"data": {"source": "builtin:demo", "index": "/etc/passwd"}}, "data.index"),
    ({"data": {"source": "builtin:demo", "index": "http://10.0.0.1/posts.db"}}, "data.index"),
    ({"train": {"device": "cuda"}}, "train.device"),
])
def test_a_relay_cannot_set_a_joiners_own_keys(tmp_path, sent, key):
    with pytest.raises(ExchangeError, match="each node sets these for itself") as err:
        join_through({**DEMO, **sent}, {"output.dir": str(tmp_path / "mine")})
    assert f"sent {key}:" in str(err.value) and "join through another relay" in str(err.value)


def test_the_joiners_own_keys_are_its_own(tmp_path):
    info = join_through(dict(DEMO), {"output.dir": str(tmp_path / "mine"), "data.workdir_max_gb": 3})
    assert str(info.config.output.dir) == str(tmp_path / "mine") and info.config.data.workdir_max_gb == 3
    assert info.config.output.checkpoint_every == 1000 and info.config.data.workdir is None  # this version's defaults


# --- wrong shapes ---

@pytest.mark.parametrize(("sent", "message"), [
    ({"output": "x"}, "sent 'output' as str ('x'): a section of the config is a mapping"),
    ({"data": "x"}, "sent 'data' as str ('x'): a section of the config is a mapping"),
    ({"train": [1, 2]}, "sent 'train' as list"),
    ({"swarm": 5}, "sent 'swarm' as int"),
    ({"model": ["builtin:tiny"]}, "names the model ['builtin:tiny']"),
    ({"data": {"source": 42}}, "key 'data.source': value 42"),
])
def test_wrong_shapes_get_the_exchanges_clear_error(tmp_path, sent, message):
    with pytest.raises(ExchangeError, match=re.escape(message)):
        join_through({**DEMO, **sent}, {"output.dir": str(tmp_path / "mine")})


def test_a_deeply_nested_answer_is_refused_with_a_clear_error():
    with serving({CONFIG_PATH: "[" * 100_000 + "]" * 100_000, PEERS_PATH: peers_answer(PEERS)}) as address, \
            pytest.raises(ExchangeError, match="nested too deeply"):
        fetch_join_info(address)


# --- values that could only be an attack ---

@pytest.mark.parametrize(("key", "value"), [
    ("target_batch_size", 10**18), ("min_peers", 10**9), ("local_steps", 10**12), ("average_state_every", 10**9),
    ("min_link_mbit", 1e-300), ("uplink_mbit", 1e-9),
])
def test_absurd_swarm_values_are_refused_naming_the_key(tmp_path, key, value):
    with pytest.raises(ExchangeError, match=f"key 'swarm.{key}'"):
        join_through({**DEMO, "swarm": {key: value}}, {"output.dir": str(tmp_path / "mine")})


@pytest.mark.parametrize(("key", "value"), [("max_image_pixels", 10**12), ("max_file_mb", 1e9),
                                            ("images_per_chunk", 10**15)])
def test_absurd_data_values_are_refused_naming_the_key(tmp_path, key, value):
    with pytest.raises(ExchangeError, match=f"key 'data.{key}'"):
        join_through({**DEMO, "data": {"source": "builtin:demo", key: value}}, {"output.dir": str(tmp_path / "m")})


# --- the model and the data a relay may name ---

@pytest.mark.parametrize("model", ["/home/victim/model", "./model", "~/model", "C:\\models\\sd", "a/b/c"])
def test_a_relay_cannot_name_a_local_model(tmp_path, model):
    with pytest.raises(ExchangeError, match="never a path on this machine"):
        join_through({**URL_SOURCE, "model": model}, {"output.dir": str(tmp_path / "mine")})


def test_a_hub_id_that_is_a_folder_here_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone" / "model").mkdir(parents=True)  # from_pretrained would load this folder, not the hub's
    with pytest.raises(ExchangeError, match="names the model 'someone/model'"):
        join_through({**URL_SOURCE, "model": "someone/model"}, {"output.dir": str(tmp_path / "mine")})
    info = join_through({**URL_SOURCE, "model": "someone/other"}, {"output.dir": str(tmp_path / "mine")})
    assert info.config.model == "someone/other"


@pytest.mark.parametrize(("key", "location", "message"), [
    ("source", "/etc", "never a path on this machine"),
    ("source", "file:///etc/passwd", "never a path on this machine"),
    ("json_source", "/home/victim/{post_id}.json", "never a path on this machine"),
    ("source", "http://localhost:8080/{post_id}.{ext}", "localhost is not a public host"),
    ("source", "http://169.254.169.254/latest/meta-data/{post_id}", "169.254.169.254 is not a public host"),
    ("source", "http://10.1.2.3/{post_id}.{ext}", "10.1.2.3 is not a public host"),
    ("source", "http://0x0a010203/{post_id}.{ext}", "10.1.2.3 is not a public host"),  # as resolvers read it
    ("source", "http://[::ffff:192.168.0.1]/{post_id}", "192.168.0.1 is not a public host"),
    ("source", "http://[fd00::1]:9000/{post_id}", "fd00::1 is not a public host"),
    ("source", "http://metadata/{post_id}.{ext}", "metadata is not a public host"),
    ("json_source", "http://nas.local/{post_id}.json", "nas.local is not a public host"),
    ("source", "http://db.internal/{post_id}.{ext}", "db.internal is not a public host"),
])
def test_a_relay_cannot_point_a_joiner_at_its_own_files_or_network(tmp_path, key, location, message):
    data = {"source": "https://bucket.example/{post_id}.{ext}", key: location}
    with pytest.raises(ExchangeError, match=message) as err:
        join_through({"model": "builtin:tiny", "data": data}, {"output.dir": str(tmp_path / "mine")})
    assert f"data.{key}" in str(err.value)


def test_public_hosts_and_the_relays_own_host_are_allowed(tmp_path):
    # the tests' relays and buckets all live on 127.0.0.1: the relay's own host is one a joiner already talks to
    own = {"source": "http://127.0.0.1:9/{post_id}.{ext}", "json_source": "http://127.0.0.1:10/{post_id}.json"}
    info = join_through({"model": "builtin:tiny", "data": own}, {"output.dir": str(tmp_path / "mine")})
    assert info.config.data.source == own["source"] and info.config.data.json_source == own["json_source"]
    # a joiner may still name its own folder or internal mirror itself
    mine = join_through({**URL_SOURCE}, {"output.dir": str(tmp_path / "m"), "data.source": "http://10.0.0.2/{post_id}"})
    assert mine.config.data.source == "http://10.0.0.2/{post_id}"


@pytest.mark.parametrize(("host", "public"), [
    ("bucket.example", True), ("8.8.8.8", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("127.1", False), ("2130706433", False), ("0.0.0.0", False), ("::1", False),
    ("10.0.0.1", False), ("172.16.0.1", False), ("192.168.1.1", False), ("100.64.0.1", False),
    ("169.254.169.254", False), ("224.0.0.1", False), ("fe80::1", False), ("localhost", False),
    ("a.localhost", False), ("printer", False), ("x.home.arpa", False),
])
def test_which_hosts_are_public(host, public):
    assert is_public_host(host) is public


# --- what a relay serves about its own machine ---

def test_a_lora_relay_does_not_name_its_base_models_folder(relay_config, tmp_path):  # noqa: F811
    base = BaseIdentity(model=str(tmp_path / "my-base"), sha256="0" * 64)
    answer = json.dumps(config_answer(relay_config, "ab" * 32, base))
    assert str(tmp_path) not in answer and "0" * 64 in answer
    training = {"mode": "lora", "base_model": base.to_json()}
    assert str(tmp_path) not in json.dumps(public_training(training))
    hub = BaseIdentity(model="someone/sd", sha256="1" * 64)
    assert public_training({"mode": "lora", "base_model": hub.to_json()})["base_model"]["model"] == "someone/sd"


# --- sdswarm status ---

def test_status_survives_a_relays_missing_and_wrong_fields(capsys):
    view = {"protocol": PROTOCOL, "run_id": "\x1b]0;pwned\x07run\x1b[31m", "epoch": float("inf"),
            "target_batch_size": "lots", "samples_per_second": float("nan"), "spread": [1],
            "training": {"mode": "lora", "rank": "\x1b[2J"},
            "peers": [{"peer_id": "\x1b[2JQmEvil\u202e", "step": 10**400, "loss": "0.1", "rounds": "g3"},
                      {}, "not a peer", {"gone": True}]}
    with serving({SWARM_PATH: view}) as address:
        assert main(["status", address]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "run ]0;pwnedrun[31m: swarm step -, -/- samples toward the target, - samples/s, 2 peers (1 gone)" in out
    assert "training: (the relay's description could not be read)" in out
    assert "one model: not known yet" in out
    assert "QmEvil" in out


def test_status_of_a_long_peer_list_is_cut():
    peer = {"peer_id": "Qm", "role": "relay", "step": 1, "local_epoch": 0, "samples_per_second": 1.0}
    lines = status_lines({"run_id": "r", "epoch": 0, "samples_toward_target": 0, "target_batch_size": 1,
                          "samples_per_second": 0, "peers": [peer] * 5000})
    assert len(lines) < 210 and lines[-1] == "... and 4800 more peers"


def test_status_of_a_relay_that_is_not_one_is_an_error(capsys):
    with serving({SWARM_PATH: ["not", "a", "view"]}) as address:
        assert main(["status", address]) == 2
    assert "cannot read" in capsys.readouterr().err
