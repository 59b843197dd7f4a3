"""A node's relay settings: how it is reached, kept in a readable YAML file beside its identity.

Two modes, as in the how-to:
- client: behind NAT, nothing listens; the node reaches the swarm through relays (hivemind client mode).
- relay: listens on internal ports and announces external ones (the port-forwarding pair behind NAT; a
  matched pair otherwise) with the public IP or domain; serves the information-exchange (I.E) endpoints.
The file holds no secret: the peer's private key lives in its own file (`identity.key`), never in here.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdswarm.atomic import write_atomic
from sdswarm.config import ConfigError, CrossKeyError, describe_errors, error_keys

# strict: a port is a whole number, never true (which pydantic would read as 1), "80" or 80.0
Port = Annotated[int, Field(ge=0, le=65535, strict=True, description="0 lets the system pick a free port")]
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
SETTINGS_FILE = "node.yaml"
IDENTITY_FILE = "identity.key"


class NodeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mode: Literal["client", "relay"] = "relay"
    public_address: str | None = Field(None, description="IP or domain others reach this node at")
    listen_host: str = Field("127.0.0.1", description="interface to listen on; 0.0.0.0 for all (internet relays)")
    ie_port_internal: Port = 8765
    ie_port_external: Port | None = Field(None, description="announced I.E port; default: the internal one")
    dht_port_internal: Port = 31337
    dht_port_external: Port | None = Field(None, description="announced DHT port; default: the internal one")
    public_downloads: bool = Field(False, strict=True, description="anyone who reaches the UI may download the "
                                   "checkpoints' models (not their training state): one such download at a time, each "
                                   "address once per 10 minutes; off: downloads need the admin token")

    @field_validator("public_address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        value = value.strip()
        try:
            ipaddress.ip_address(value)
            return value
        except ValueError:
            pass
        message = "must be an IPv4/IPv6 address or a domain name such as node.example.org"
        try:  # a name in another script is kept in its ASCII (IDNA) form, the one DNS and multiaddrs carry
            name = value.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(message) from None
        labels = name.rstrip(".").split(".")
        if len(name) > 253 or labels[-1].isdigit() or not all(_LABEL.fullmatch(label) for label in labels):
            raise ValueError(message + " (letters, digits and '-' in dot-separated parts)")
        return name

    @field_validator("listen_host")
    @classmethod
    def _check_listen_host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("must be an IP address to listen on, e.g. 0.0.0.0 (all) or 127.0.0.1") from None
        return value

    @model_validator(mode="after")
    def _check_external_ports(self) -> NodeSettings:
        for kind in ("ie", "dht"):
            internal, external = getattr(self, f"{kind}_port_internal"), getattr(self, f"{kind}_port_external")
            if internal == 0 and external not in (None, 0):
                raise CrossKeyError(f"{kind}_port_external ({external}) needs a fixed {kind}_port_internal, not 0: "
                                    "a forwarded port must point at a known internal port",
                                    f"{kind}_port_external", f"{kind}_port_internal")
        return self

    @property
    def client_mode(self) -> bool:
        return self.mode == "client"

    def dht_host_maddrs(self) -> list[str]:
        if self.client_mode:  # listens nowhere reachable: loopback only, other peers are dialled out
            return ["/ip4/127.0.0.1/tcp/0"]
        return [f"/{_ip_protocol(self.listen_host)}/{self.listen_host}/tcp/{self.dht_port_internal}"]

    def dht_announce_maddrs(self) -> list[str]:
        """What other peers are told to dial; empty lets hivemind announce what it listens on."""
        if self.client_mode or self.public_address is None:
            return []
        port = self.dht_port_external if self.dht_port_external is not None else self.dht_port_internal
        return [f"/{_address_protocol(self.public_address)}/{self.public_address}/tcp/{port}"]


def _ip_protocol(ip: str) -> str:
    return "ip6" if ipaddress.ip_address(ip).version == 6 else "ip4"


def _address_protocol(address: str) -> str:
    try:
        return _ip_protocol(address)
    except ValueError:
        return "dns"


def load_settings(folder: Path) -> NodeSettings:
    """The node's settings from `folder/node.yaml`; defaults when there is none yet."""
    path = Path(folder) / SETTINGS_FILE
    if not path.exists():
        return NodeSettings()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return NodeSettings.model_validate(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"{path}: {'; '.join(describe_errors(exc, NodeSettings))}", error_keys(exc)) from None


def update_settings(settings: NodeSettings, changes: dict[str, Any]) -> NodeSettings:
    """A copy with `changes` applied and the whole validated; ConfigError naming the bad keys otherwise."""
    try:
        return NodeSettings.model_validate({**settings.model_dump(), **changes})
    except ValidationError as exc:
        raise ConfigError(f"node settings: {'; '.join(describe_errors(exc, NodeSettings))}",
                          error_keys(exc)) from None


def save_settings(settings: NodeSettings, folder: Path) -> Path:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    text = ("# sdswarm node settings (see `sdswarm settings --help`)\n"
            + yaml.safe_dump(settings.model_dump(), sort_keys=False))
    return write_atomic(Path(folder) / SETTINGS_FILE, text.encode("utf-8"), durable=True)

