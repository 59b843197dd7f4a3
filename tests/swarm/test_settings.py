"""Relay settings as the how-to describes them: client or relay, internal/external port pairs, public address."""

from __future__ import annotations

import pytest

from sdswarm.cli import main
from sdswarm.config import ConfigError
from sdswarm.swarm.settings import SETTINGS_FILE, NodeSettings, load_settings, save_settings, update_settings


def test_behind_nat_listen_on_internal_ports_and_announce_the_forwarded_ones():
    settings = NodeSettings(mode="relay", public_address="203.0.113.7", listen_host="0.0.0.0",
                            dht_port_internal=31337, dht_port_external=40000)
    assert settings.dht_host_maddrs() == ["/ip4/0.0.0.0/tcp/31337"]
    assert settings.dht_announce_maddrs() == ["/ip4/203.0.113.7/tcp/40000"]


def test_not_behind_nat_matched_pairs_and_domains():
    settings = NodeSettings(public_address="node.example.org", dht_port_internal=31337)
    assert settings.dht_announce_maddrs() == ["/dns/node.example.org/tcp/31337"]
    assert NodeSettings(public_address="2001:db8::1").dht_announce_maddrs() == ["/ip6/2001:db8::1/tcp/31337"]


def test_client_mode_listens_nowhere_public():
    settings = NodeSettings(mode="client", public_address="203.0.113.7")
    assert settings.client_mode
    assert settings.dht_host_maddrs() == ["/ip4/127.0.0.1/tcp/0"]
    assert settings.dht_announce_maddrs() == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mode": "server"}, r"key 'mode': value 'server'"),
        ({"public_address": "not an address!"}, r"IPv4/IPv6 address or a domain"),
        ({"ie_port_internal": 70000}, r"key 'ie_port_internal': value 70000"),
        ({"listen_host": "everywhere"}, r"IP address to listen on"),
        ({"dht_port_internal": 0, "dht_port_external": 4000}, r"needs a fixed dht_port_internal"),
        ({"token": "x"}, r"unknown key 'token'"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        update_settings(NodeSettings(), changes)


def test_settings_file_is_readable_text_and_round_trips(tmp_path):
    settings = NodeSettings(mode="relay", public_address="203.0.113.7", ie_port_external=80)
    save_settings(settings, tmp_path)
    text = (tmp_path / SETTINGS_FILE).read_text()
    assert "public_address: 203.0.113.7" in text and "ie_port_external: 80" in text
    assert load_settings(tmp_path) == settings
    assert load_settings(tmp_path / "nothing-yet") == NodeSettings()  # defaults before the first save
    (tmp_path / SETTINGS_FILE).write_text("mode: [broken\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(tmp_path)


def test_the_settings_command_edits_the_file(tmp_path, capsys):
    assert main(["settings", "--output", str(tmp_path), "public_address=203.0.113.7", "ie_port_external=80"]) == 0
    assert load_settings(tmp_path).ie_port_external == 80
    assert "announced DHT address: /ip4/203.0.113.7/tcp/31337" in capsys.readouterr().out
    assert main(["settings", "--output", str(tmp_path), "mode=server"]) == 2
    assert "key 'mode': value 'server'" in capsys.readouterr().err
    assert load_settings(tmp_path).mode == "relay"  # a refused change loses nothing
