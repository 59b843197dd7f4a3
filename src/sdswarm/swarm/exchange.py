"""The information exchange (I.E): what a relay tells a joining node, and how a joiner asks for it.

A relay answers two questions over HTTP, as in the how-to: which training config the swarm runs, and which
DHT addresses to start from. Any relay answers them, so the mother is not a single point of failure.
The config that leaves a node is its public view: the training recipe only, no local path, no secret.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from sdswarm import __version__
from sdswarm.config import Config, ConfigError, parse_config, set_dotted

PROTOCOL = 1  # bump when the answers change shape; joiners refuse a relay that speaks another
CONFIG_PATH = "/api/v1/config"
PEERS_PATH = "/api/v1/peers"
SWARM_PATH = "/api/v1/swarm"
DATA_PATH = "/api/v1/data"  # a relay training on builtin:demo serves its files here; its joiners fetch them

# Keys that describe one machine, not the swarm: never served, each node sets its own.
LOCAL_KEYS: dict[str, Any] = {
    "output": True,
    "data": {"workdir", "loader_workers"},
    "train": {"device"},
}


def public_config(config: Config) -> dict[str, Any]:
    view = config.model_dump(mode="json", exclude=LOCAL_KEYS)
    if not _is_shared_source(config.data.source):
        del view["data"]["source"]  # a folder on the mother's disk means nothing to another machine
    return view


def _is_shared_source(source: str) -> bool:
    return source.startswith(("builtin:", "http://", "https://"))


def config_answer(config: Config) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "version": __version__, "config": public_config(config)}


def peers_answer(visible_maddrs: list[str]) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "version": __version__, "peers": visible_maddrs}


@dataclass
class JoinInfo:
    base_url: str
    config: Config
    peers: list[str]


class ExchangeError(RuntimeError):
    """A relay that cannot be reached or whose answer this node cannot use."""


def base_url(address: str) -> str:
    """`host:port`, `host` (port 80, as the how-to forwards it) or a full http(s) URL."""
    address = address.strip().rstrip("/")
    if not address:
        raise ExchangeError("empty relay address: give HOST:PORT of a relay's I.E port, e.g. 203.0.113.7:8765")
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


def fetch_join_info(address: str, local_overrides: dict[str, Any] | None = None, timeout: float = 15.0) -> JoinInfo:
    """Ask a relay for the swarm's config and DHT addresses; validate both with this version's schema.

    `local_overrides` (dotted keys) are this node's own settings (output folder, device, data source) and
    win over nothing the relay sent: the relay never sends them.
    """
    url = base_url(address)
    config_data = asyncio.run(_get_json(url + CONFIG_PATH, timeout))
    peers_data = asyncio.run(_get_json(url + PEERS_PATH, timeout))
    for where, answer in ((CONFIG_PATH, config_data), (PEERS_PATH, peers_data)):
        if not isinstance(answer, dict) or answer.get("protocol") != PROTOCOL:
            got = answer.get("protocol") if isinstance(answer, dict) else type(answer).__name__
            raise ExchangeError(
                f"relay {url} answered {where} with protocol {got!r}, this node speaks {PROTOCOL} "
                f"(sdswarm {__version__}; the relay runs {_version_of(answer)}): use the same sdswarm version"
            )
    config = config_data.get("config")
    if not isinstance(config, dict):
        raise ExchangeError(f"relay {url} sent no training config in {CONFIG_PATH}")
    for dotted, value in (local_overrides or {}).items():
        set_dotted(config, dotted, value)
    if "source" not in config.get("data", {}):
        raise ExchangeError(
            f"the swarm at {url} trains on a folder on its mother's disk; give this node its own copy of the data "
            "with --set data.source=DIR (or run the swarm on a shared bucket)"
        )
    try:
        parsed = parse_config(config, source=f"training config from relay {url}")
    except ConfigError as exc:
        raise ExchangeError(f"{exc}\n(this node runs sdswarm {__version__}, the relay {_version_of(config_data)}; "
                            "mismatched versions are the usual cause)") from None
    peers = peers_data.get("peers")
    if not isinstance(peers, list) or not peers or not all(isinstance(p, str) and p.startswith("/") for p in peers):
        raise ExchangeError(f"relay {url} sent no usable DHT addresses in {PEERS_PATH}: {peers!r}")
    return JoinInfo(base_url=url, config=parsed, peers=peers)


def fetch_peers(address: str, timeout: float = 5.0) -> list[str]:
    """A relay's DHT addresses (its peers answer), to rejoin the swarm through it."""
    url = base_url(address)
    answer = asyncio.run(_get_json(url + PEERS_PATH, timeout))
    peers = answer.get("peers") if isinstance(answer, dict) and answer.get("protocol") == PROTOCOL else None
    if not isinstance(peers, list) or not all(isinstance(p, str) and p.startswith("/") for p in peers):
        raise ExchangeError(f"relay {url} sent no usable DHT addresses in {PEERS_PATH}")
    return peers


def fetch_swarm_view(address: str, timeout: float = 15.0) -> dict[str, Any]:
    url = base_url(address)
    answer = asyncio.run(_get_json(url + SWARM_PATH, timeout))
    if not isinstance(answer, dict) or answer.get("protocol") != PROTOCOL or "peers" not in answer:
        raise ExchangeError(f"relay {url} sent an answer to {SWARM_PATH} this version cannot read")
    return answer


def _version_of(answer: Any) -> str:
    return str(answer.get("version", "an unknown version")) if isinstance(answer, dict) else "an unknown version"


async def _get_json(url: str, timeout: float) -> Any:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url) as response,
        ):
            if response.status != 200:
                raise ExchangeError(f"relay answered {url} with HTTP {response.status}: is this a relay's I.E port?")
            body = await response.content.read(1 << 20)  # a config is a few KB; never buffer more than 1 MB
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ExchangeError(f"cannot reach the relay at {url}: {exc or type(exc).__name__} "
                            "(check the address, the I.E port and its port forwarding)") from None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ExchangeError(f"relay answered {url} with something that is not JSON: {body[:80]!r}") from None
