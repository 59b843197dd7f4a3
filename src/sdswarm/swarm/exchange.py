"""The information exchange (I.E): what a relay tells a joining node, and how a joiner asks for it.

A relay answers two questions over HTTP, as in the how-to: which training config the swarm runs, and which
DHT addresses to start from. Any relay answers them, so the mother is not a single point of failure.
The config that leaves a node is its public view: the training recipe only, no local path, no secret.
A joiner trusts a relay with the recipe and nothing else: a key that is each node's own (its folders, disk budget,
device, workers, checkpoint cadence) is refused when a relay sends it, and the model and data locations a relay names
must be shared ones (a hub id; builtin:; an http(s) URL on a public host or on the relay's own host).
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
from sdswarm.hosts import host_of, is_public_host

if TYPE_CHECKING:  # model.lora imports torch, peft and diffusers: `sdswarm status` should not wait for them
    from sdswarm.model.lora import BaseIdentity

# bump when the answers change shape; joiners refuse a relay that speaks another
# (2: the index named by its hash; LoRA swarms name their base model)
PROTOCOL = 2
CONFIG_PATH = "/api/v1/config"
PEERS_PATH = "/api/v1/peers"
SWARM_PATH = "/api/v1/swarm"
DATA_PATH = "/api/v1/data"  # a relay training on builtin:demo serves its files here; its joiners fetch them

# Keys that describe one machine, not the swarm: never served, each node sets its own, and a joiner refuses a relay
# that sends one (an honest relay of this protocol never does). data.index is a path or a URL on the relay's side:
# the swarm's index is named by data.index_sha256 and downloaded from the relay.
LOCAL_KEYS: dict[str, Any] = {
    "output": True,
    "data": {"workdir", "workdir_max_gb", "loader_workers", "index"},
    "train": {"device"},
}
SECTIONS = ("data", "train", "output", "swarm")


def public_config(config: Config, index_sha256: str | None = None) -> dict[str, Any]:
    """The swarm's config as a relay serves it: the index named by its hash (joiners download it from the
    relay, or check their own copy against it), and no path on this machine's disk."""
    view = config.model_dump(mode="json", exclude=LOCAL_KEYS)
    data = view["data"]
    data["index_sha256"] = index_sha256 or config.data.index_sha256
    for key in ("source", "json_source"):
        if data[key] is not None and not _is_shared_location(data[key]):
            del data[key]  # a folder on the mother's disk means nothing to another machine
    if not _is_shared_model(config.model):
        del view["model"]
    return view


def _is_shared_location(location: str) -> bool:
    return location.startswith(("builtin:", "http://", "https://"))


def public_base_model(identity: dict[str, Any]) -> dict[str, Any]:
    """A LoRA base model's identity as a relay serves it: a folder on this machine's disk is not named."""
    model = identity.get("model")
    if isinstance(model, str) and not _is_shared_model(model):
        return {**identity, "model": "a folder on the relay's disk"}
    return identity


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
        answer["base_model"] = public_base_model(lora_base.to_json())
    return answer


def public_training(training: dict[str, Any] | None) -> dict[str, Any] | None:
    """A node's training mode (node.training_mode) as a relay serves it: the base model's folder not named."""
    if not training or not isinstance(training.get("base_model"), dict):
        return training
    return {**training, "base_model": public_base_model(training["base_model"])}


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
    check_relay_config(config, url)
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


def check_relay_config(config: dict[str, Any], url: str) -> None:
    """Refuse a relay's config that reaches past the swarm's recipe: a section that is not a mapping, a key that is
    each node's own, a model that is not a hub id or builtin, a data location on this machine or inside its network
    (the relay's own host is allowed: a joiner already talks to it)."""
    for section in SECTIONS:
        if section in config and not isinstance(config[section], dict):
            raise ExchangeError(
                f"relay {url} sent '{section}' as {type(config[section]).__name__} ({_short(config[section])}): a "
                "section of the config is a mapping of keys to values; this relay is broken or not an sdswarm relay")
    local = _local_keys(config)
    if local:
        raise ExchangeError(
            f"relay {url} sent {', '.join(local)}: each node sets these for itself (its folders, disk budget, device, "
            "workers, checkpoint cadence), so a relay never sends them and this node does not take them from one; "
            "join through another relay")
    model = config.get("model")
    if model is not None and not (isinstance(model, str) and _is_shared_model(model)):
        raise ExchangeError(
            f"relay {url} names the model {_short(model)}: a relay names a hub id or builtin:tiny, never a path on "
            "this machine; if the swarm trains a local folder, give this node its own copy with --set model=DIR")
    relay_host = host_of(url)
    data = config.get("data", {})
    for key in ("source", "json_source"):
        location = data.get(key)
        if not isinstance(location, str) or location.startswith("builtin:"):
            continue  # the schema names a wrong type; builtin: names data every node makes for itself
        if not location.startswith(("http://", "https://")):
            raise ExchangeError(
                f"relay {url} sent data.{key} {_short(location)}: a relay names shared data (an http(s) URL or "
                f"builtin:), never a path on this machine; give this node its own copy with --set data.{key}=DIR")
        host = host_of(location)
        if host != relay_host and not is_public_host(host):
            raise ExchangeError(
                f"relay {url} sent data.{key} {_short(location)}: {host or 'no host'} is not a public host (loopback, "
                "private network, link-local or a local name), and a relay may only point this node at the public "
                "internet or at its own host; if the data really lives there, give it with --set data.source=URL")


def _local_keys(config: dict[str, Any]) -> list[str]:
    found = []
    for section, keys in LOCAL_KEYS.items():
        if keys is True:
            found += [section] if section in config else []
        else:
            found += [f"{section}.{key}" for key in sorted(keys) if key in config.get(section, {})]
    return found


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
    except RecursionError:  # a few KB of [[[[... : no honest answer is nested that deep
        raise ExchangeError(f"relay answered {url} with JSON nested too deeply to read") from None
