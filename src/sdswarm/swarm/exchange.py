"""The information exchange (I.E): what a relay tells a joining node, and how a joiner asks for it.

A relay answers two questions over HTTP, as in the how-to: which training config the swarm runs, and which
DHT addresses to start from. Any relay answers them, so the mother is not a single point of failure.
The config that leaves a node is its public view: the training recipe only, no local path, no secret.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from huggingface_hub.utils import HFValidationError, validate_repo_id

from sdswarm import __version__
from sdswarm.config import Config, ConfigError, parse_config, set_dotted

if TYPE_CHECKING:  # model.lora imports torch, peft and diffusers: `sdswarm status` should not wait for them
    from sdswarm.model.lora import BaseIdentity

# bump when the answers change shape; joiners refuse a relay that speaks another
# (2: the index named by its hash; LoRA swarms name their base model)
PROTOCOL = 2
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


def public_config(config: Config, index_sha256: str | None = None) -> dict[str, Any]:
    """The swarm's config as a relay serves it: the index named by its hash (joiners download it from the
    relay, or check their own copy against it), and no path on this machine's disk."""
    view = config.model_dump(mode="json", exclude=LOCAL_KEYS)
    data = view["data"]
    del data["index"]  # a path here, or a URL: the hash says which index, the relay serves it
    data["index_sha256"] = index_sha256 or config.data.index_sha256
    for key in ("source", "json_source"):
        if data[key] is not None and not _is_shared_location(data[key]):
            del data[key]  # a folder on the mother's disk means nothing to another machine
    if not _is_shared_model(config.model):
        del view["model"]
    return view


def _is_shared_location(location: str) -> bool:
    return location.startswith(("builtin:", "http://", "https://"))


def _is_shared_model(model: str) -> bool:
    """A hub id or a builtin: the same on every machine (a folder path is not)."""
    if model.startswith("builtin:"):
        return True
    if model.startswith((".", "/", "~")) or "\\" in model or Path(model).expanduser().exists():
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def config_answer(config: Config, index_sha256: str | None = None,
                  lora_base: BaseIdentity | None = None) -> dict[str, Any]:
    """The swarm's training config, and in LoRA mode the base model its adapters belong to (a joiner with another
    base refuses to train)."""
    answer = {"protocol": PROTOCOL, "version": __version__, "config": public_config(config, index_sha256)}
    if lora_base is not None:
        answer["base_model"] = lora_base.to_json()
    return answer


def peers_answer(visible_maddrs: list[str]) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "version": __version__, "peers": visible_maddrs}


def describe_training(training: dict[str, Any]) -> str:
    """A node's training mode (node.training_mode) in one line, for its log and `sdswarm status`."""
    what = "UNet + text encoder" if training["text_encoder"] else "UNet"
    size = f"{training['parameters']:,} parameters, {training['megabytes']:g} MB in fp32"
    if training["mode"] != "lora":
        return f"full fine-tune of the {what}: {size}"
    base = training.get("base_model") or {}
    return (f"LoRA rank {training['rank']} (alpha {training['alpha']:g}) on the {what}: hivemind averages the adapters "
            f"only, {size}; the base model {base.get('model')} (weights sha256 {str(base.get('sha256'))[:16]}) stays "
            "frozen")


@dataclass
class JoinInfo:
    base_url: str
    config: Config
    peers: list[str]
    base_model: BaseIdentity | None = None  # LoRA swarms: the base the adapters belong to


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
    if "model" in (local_overrides or {}) and "model" in config:
        raise ExchangeError(f"the swarm at {url} trains {config['model']}: a joiner cannot choose another model "
                            "(model is a joiner's own only when the swarm's is a folder on its mother's disk)")
    for dotted, value in (local_overrides or {}).items():
        set_dotted(config, dotted, value)
    if "source" not in config.get("data", {}):
        raise ExchangeError(
            f"the swarm at {url} trains on a folder on its mother's disk; give this node its own copy of the data "
            "with --set data.source=DIR (or run the swarm on a shared bucket)"
        )
    if "model" not in config:
        raise ExchangeError(
            f"the swarm at {url} trains a model from a folder on its mother's disk; give this node its own copy "
            "with --set model=DIR (a diffusers folder)"
        )
    try:
        parsed = parse_config(config, source=f"training config from relay {url}")
    except ConfigError as exc:
        raise ExchangeError(f"{exc}\n(this node runs sdswarm {__version__}, the relay {_version_of(config_data)}; "
                            "mismatched versions are the usual cause)") from None
    peers = peers_data.get("peers")
    if not isinstance(peers, list) or not peers or not all(isinstance(p, str) and p.startswith("/") for p in peers):
        raise ExchangeError(f"relay {url} sent no usable DHT addresses in {PEERS_PATH}: {peers!r}")
    base_model = None
    if parsed.train.lora is not None:
        from sdswarm.model.lora import BaseIdentity

        try:
            base_model = BaseIdentity.from_json(config_data.get("base_model"), f"relay {url}'s base_model")
        except ValueError as exc:
            raise ExchangeError(f"{exc}: a LoRA swarm's relay names its base model") from None
    return JoinInfo(base_url=url, config=parsed, peers=peers, base_model=base_model)


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
