"""Command line: mother, join, status, settings, invite, ban; and `python server.py -m CONFIG` / `-j ADDRESS` as in the
how-to."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import transformers
import yaml

from sdswarm.config import ConfigError, load_config
from sdswarm.logs import setup_logging

log = logging.getLogger("sdswarm")

# What a joining node may set for itself; everything else is the swarm's and comes from the relay.
# (A key ending in "." covers its section.) `model` only where the swarm's is a folder on the mother's disk.
JOINER_KEYS = ("output.", "data.workdir", "data.workdir_max_gb", "data.loader_workers", "data.source", "data.index",
               "model", "train.device",
               "train.batch_size", "train.gradient_checkpointing", "train.attention", "train.max_steps",
               "swarm.uplink_mbit", "swarm.min_link_mbit")
DEFAULT_JOIN_OUTPUT = "output/joined"


def parse_pairs(pairs: Sequence[str], flag: str) -> dict:
    """`KEY=VALUE` strings -> {"KEY": value}; values are read as YAML (numbers, booleans, lists)."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE, e.g. {flag} train.max_steps=100")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output")
    parser.add_argument("--max-steps", type=int, help="stop after this many local steps (train.max_steps)")
    parser.add_argument("--output", help="this node's folder: checkpoints, samples, node settings, identity")
    parser.add_argument("--log-with", action="append", choices=("tensorboard", "wandb"), metavar="TRACKER",
                        help="also send metrics to tensorboard or wandb (output.log_with; repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set swarm.target_batch_size=64 (repeatable)")
    parser.add_argument("--verbose", action="store_true",
                        help="hivemind's progress lines on the terminal too (they are always in OUTPUT/node.log)")


def add_invite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--invite", default=None, metavar="INVITE",
                        help="the invite the swarm's mother gave you (sdswarm invite prints the whole command); needed "
                             "once: the node keeps its access (OUTPUT/access.json). Or set SDSWARM_INVITE")


def add_rejoin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", action="append", default=[], metavar="ADDRESS",
                        help="rejoin a running swarm: a relay's HOST:PORT or a DHT multiaddr (repeatable); with "
                             "--resume the peers this node last saw (OUTPUT/peers) are tried too")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdswarm", description="Fine-tune Stable Diffusion together with hivemind.")
    commands = parser.add_subparsers(dest="command", required=True)

    mother = commands.add_parser("mother", help="start the first node of a swarm and train")
    mother.add_argument("config", help="YAML training config, e.g. configs/sd_1-5.yaml")
    add_training_arguments(mother)
    add_rejoin_argument(mother)

    join = commands.add_parser("join", help="join a swarm through any relay and train with it")
    join.add_argument("address", help="a relay's I.E address, HOST:PORT (the command a relay prints)")
    add_training_arguments(join)
    add_invite_argument(join)

    server = commands.add_parser("server", help="the how-to's server.py: -m CONFIG or -j ADDRESS")
    start = server.add_mutually_exclusive_group(required=True)
    start.add_argument("-m", "--mother", metavar="CONFIG", help="start in mother mode with CONFIG")
    start.add_argument("-j", "--join", metavar="ADDRESS", help="join the swarm through the relay at ADDRESS")
    add_training_arguments(server)
    add_rejoin_argument(server)
    add_invite_argument(server)

    status = commands.add_parser("status", help="show a swarm: peers, throughput, progress toward the target batch")
    status.add_argument("address", help="a relay's I.E address, HOST:PORT")

    invite = commands.add_parser(
        "invite", help="print a join command with an invite for one new peer (run it beside the mother)",
        description="The invite is signed by the swarm's key (OUTPUT/swarm.key, made by the mother) and admits the "
                    "first peer that joins with it, within --hours.")
    invite.add_argument("--output", default="output", help="the mother's folder (default: %(default)s)")
    invite.add_argument("--hours", type=float, default=24.0, help="how long the invite may be used (default: 24)")
    invite.add_argument("--address", help="the relay address joiners use, HOST:PORT (default: from the node settings)")

    ban = commands.add_parser(
        "ban", help="ban peers from the swarm (run it beside the mother); the running node spreads the ban list",
        description="Banned peers get no answer from any peer's DHT, averaging rounds or state downloads.")
    ban.add_argument("peer_ids", nargs="+", metavar="PEER_ID", help="a peer id, as `sdswarm status` and the UI show it")
    ban.add_argument("--output", default="output", help="the mother's folder (default: %(default)s)")
    ban.add_argument("--lift", action="store_true", help="lift the ban on these peers instead")

    settings = commands.add_parser(
        "settings", help="show or change this node's relay settings",
        description="KEY=VALUE pairs change the settings file (OUTPUT/node.yaml), e.g. mode=relay "
                    "public_address=203.0.113.7 listen_host=0.0.0.0 ie_port_internal=8765 ie_port_external=80 "
                    "dht_port_internal=31337. Behind NAT, forward the external ports to the internal ones; "
                    "otherwise leave the external ports unset (matched pairs).",
    )
    settings.add_argument("changes", nargs="*", metavar="KEY=VALUE")
    settings.add_argument("--output", default="output", help="the node's folder (default: %(default)s)")

    export = commands.add_parser(
        "export", help="write a checkpoint as one .safetensors file (A1111, ComfyUI)",
        description="A full fine-tune's checkpoint: the whole model in the original SD layout. A LoRA checkpoint: the "
                    "adapters (--format kohya for A1111/ComfyUI, diffusers for load_lora_weights), or with --merge the "
                    "base with the adapters merged in, as one model file.")
    export.add_argument("checkpoint", help="a checkpoint folder, e.g. output/checkpoints/step_00001000")
    export.add_argument("out", help="the .safetensors file to write")
    export.add_argument("--ema", action="store_true", help="the EMA weights (the run had use_ema: True)")
    export.add_argument("--half", action="store_true", help="store fp16: half the size")
    export.add_argument("--format", choices=("kohya", "diffusers"),
                        help="LoRA checkpoints: kohya's layout (A1111, ComfyUI; the default) or diffusers'")
    export.add_argument("--merge", action="store_true", help="LoRA checkpoints: the base with the adapters merged in")

    index = commands.add_parser("index", help="dataset index tools")
    index_build = index.add_subparsers(dest="index_command", required=True).add_parser(
        "build", help="build the SQLite index of posts")
    source = index_build.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folder", type=Path, metavar="DIR", help="a folder of {post_id}.{ext} + .json pairs")
    source.add_argument("--from-dump", type=Path, metavar="FILE",
                        help="a Danbooru metadata dump: JSON list or JSONL, API or yearly-dump shape (.gz ok)")
    index_build.add_argument("--out", type=Path, required=True, metavar="INDEX_DB", help="the index file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=getattr(args, "verbose", False))
    try:
        if args.command == "status":
            return show_status(args.address)
        if args.command == "settings":
            return edit_settings(Path(args.output), args.changes)
        if args.command == "invite":
            return print_invite(Path(args.output), args.hours, args.address)
        if args.command == "ban":
            return ban_peers(Path(args.output), args.peer_ids, lift=args.lift)
        if args.command == "index":
            return build_index(args.from_folder, args.from_dump, args.out)
        if args.command == "export":
            return export(args.checkpoint, args.out, ema=args.ema, half=args.half, fmt=args.format, merge=args.merge)
        overrides = parse_pairs(args.overrides, "--set")
        if args.max_steps is not None:
            overrides["train.max_steps"] = args.max_steps
        if args.output is not None:
            overrides["output.dir"] = args.output
        if args.log_with:
            overrides["output.log_with"] = args.log_with
        join_address = args.address if args.command == "join" else getattr(args, "join", None)
        if join_address is not None:
            invite = args.invite or os.environ.get("SDSWARM_INVITE")
            return join(join_address, overrides, resume=args.resume, invite=invite)
        config = load_config(args.config if args.command == "mother" else args.mother, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from sdswarm.node import run_mother  # heavy imports only once the config is known to be good

    transformers.logging.set_verbosity_error()  # it warns about image processors SD training never uses
    try:
        run_mother(config, resume=args.resume, peers=args.peers)
    except ConfigError as exc:  # the model, the index, a LoRA base, the swarm key: before training
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def join(address: str, overrides: dict, *, resume: bool, invite: str | None = None) -> int:
    from sdswarm.node import run_node
    from sdswarm.swarm.exchange import ExchangeError, fetch_join_info
    from sdswarm.swarm.settings import load_settings

    swarm_keys = [key for key in overrides if not any(key == own or (own.endswith(".") and key.startswith(own))
                                                      for own in JOINER_KEYS)]
    if swarm_keys:
        raise ConfigError(f"{', '.join(swarm_keys)}: set by the swarm, not by a joining node "
                          f"(a joiner may set: {', '.join(JOINER_KEYS)})")
    overrides.setdefault("output.dir", DEFAULT_JOIN_OUTPUT)
    settings = load_settings(Path(overrides["output.dir"]))
    try:
        info = fetch_join_info(address, overrides)
    except ExchangeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("joining run %r through %s (%d DHT addresses)", info.config.swarm.run_id, info.base_url, len(info.peers))
    transformers.logging.set_verbosity_error()
    try:
        run_node(info.config, role="joiner", settings=settings, initial_peers=info.peers, resume=resume,
                 relay=info.base_url, swarm_base=info.base_model, invite=invite)
    except ConfigError as exc:  # the model, the index, a LoRA base, the invite: before training
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def export(checkpoint: str, out: str, *, ema: bool, half: bool, fmt: str | None = None, merge: bool = False) -> int:
    from sdswarm.train.checkpoint import CONFIG_FILE
    from sdswarm.train.export import export_single_file
    from sdswarm.train.lora_export import export_lora_checkpoint, is_lora_checkpoint

    transformers.logging.set_verbosity_error()
    try:
        if not is_lora_checkpoint(checkpoint):
            if merge or fmt:
                raise ValueError(f"{checkpoint} is a full fine-tune's checkpoint: --merge and --format are for LoRA "
                                 "checkpoints; leave them out")
            path = export_single_file(checkpoint, out, use_ema=ema, half=half)
        else:
            if half and not merge:
                raise ValueError("--half applies to --merge only: adapters are exported as trained (fp32, megabytes)")
            config = load_config(Path(checkpoint) / CONFIG_FILE)  # the model and LoRA settings it was trained with
            path = export_lora_checkpoint(checkpoint, out, model=config.model, lora=config.train.lora,
                                          text_encoder=config.train_text_encoder, use_ema=ema, fmt=fmt or "kohya",
                                          merge=merge, half=half)
        print(f"wrote {path}")
    except (FileNotFoundError, ValueError) as exc:  # ConfigError and BaseModelMismatch are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_index(folder: Path | None, dump: Path | None, out: Path) -> int:
    """`sdswarm index build`: prints what was indexed and skipped."""
    from sdswarm.data.index import build_from_dump, build_from_folder

    start = time.perf_counter()
    try:
        report = build_from_folder(folder, out) if folder is not None else build_from_dump(dump, out)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    if report.rows == 0:  # an empty index trains nothing: say why instead of leaving one behind
        Path(out).unlink(missing_ok=True)
        print(f"error: no trainable post in {folder or dump}: {report}. A dump must hold Danbooru posts (objects "
              "with id, md5, file_ext, tags), as a JSON list or one per line (JSONL); a folder, {post_id}.{ext} "
              "images with {post_id}.json beside them", file=sys.stderr)
        return 1
    print(f"{out}: {report} ({time.perf_counter() - start:.1f} s)")
    return 0


def show_status(address: str) -> int:
    from sdswarm.swarm.exchange import ExchangeError, fetch_swarm_view

    try:
        view = fetch_swarm_view(address)
    except ExchangeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(status_lines(view)))
    return 0


MAX_STATUS_PEERS = 200  # a relay's view is a few dozen peers; a longer list is cut, saying how many were left out


def status_lines(view: dict) -> list[str]:
    """`sdswarm status` as lines of text. Everything in `view` comes from other peers: each value is checked on its
    own (a missing or wrong one prints '-', never fails the whole view) and only printable characters of bounded
    length reach the terminal."""
    from sdswarm.swarm.exchange import describe_training

    raw_peers = view.get("peers")
    peers = [p for p in raw_peers if isinstance(p, dict)] if isinstance(raw_peers, list) else []
    live = [p for p in peers if not p.get("gone")]
    target, toward = _int(view.get("target_batch_size")), _int(view.get("samples_toward_target"))
    progress = "-/- samples toward the target"
    if target is not None and target > 0 and toward is not None:
        toward = min(max(toward, 0), target)
        progress = f"{toward}/{target} samples toward the target ({toward / target:.0%})"
    spread, spread_step = _float(view.get("spread")), _int(view.get("spread_step"))
    lines = [
        f"run {_text(view.get('run_id', '-'), 64)}: swarm step {_shown(_int(view.get('epoch')))}, {progress}, "
        f"{_shown(_float(view.get('samples_per_second')), '.1f')} samples/s, {len(live)} peers"
        + (f" ({len(peers) - len(live)} gone)" if len(peers) > len(live) else ""),
        "one model: " + ("not known yet (peers publish a fingerprint after each swarm step)" if spread is None else
                         f"spread {spread:.2f} swarm steps' worth at step {_shown(spread_step)}"
                         + (" - peers have drifted apart" if spread > 1 else "")),
    ]
    training = view.get("training")
    if training:
        try:
            lines.append(f"training: {_text(describe_training(training), 200)}")
        except (KeyError, TypeError, ValueError, AttributeError):
            lines.append("training: (the relay's description could not be read)")
    lines.append(f"{'peer':<16} {'role':<7} {'state':<8} {'address':<22} {'step':>7} {'sw.step':>7} {'loss':>8} "
                 f"{'samples/s':>9} {'grad norm':>9}  last rounds (g: gradients, p: parameters, o: outer)")
    for peer in peers[:MAX_STATUS_PEERS]:
        state = "gone" if peer.get("gone") else _text(peer.get("state", "training"), 8)
        rounds = peer.get("rounds") if isinstance(peer.get("rounds"), list) else []
        marks = " ".join(_round_mark(r) for r in rounds[-6:] if isinstance(r, dict))
        lines.append(
            f"{_text(peer.get('peer_id', '-'), 128)[-16:]:<16} {_text(peer.get('role', '-'), 7):<7} {state:<8} "
            f"{_text(peer.get('address') or '-', 22):<22} {_shown(_int(peer.get('step'))):>7} "
            f"{_shown(_int(peer.get('local_epoch'))):>7} {_shown(_float(peer.get('loss')), '.4f'):>8} "
            f"{_shown(_float(peer.get('samples_per_second')), '.1f'):>9} "
            f"{_shown(_float(peer.get('grad_norm')), '.3g'):>9}  {marks}")
    if len(peers) > MAX_STATUS_PEERS:
        lines.append(f"... and {len(peers) - MAX_STATUS_PEERS} more peers")
    refused: dict[str, int] = {}  # sender -> parts refused or clipped in the rounds the peers publish
    for peer in peers[:MAX_STATUS_PEERS]:
        rounds = peer.get("rounds") if isinstance(peer.get("rounds"), list) else []
        for entry in rounds:
            if isinstance(entry, dict) and isinstance(entry.get("refused"), dict):
                for sender, parts in list(entry["refused"].items())[:MAX_STATUS_PEERS]:
                    sender = _text(sender, 128)
                    refused[sender] = refused.get(sender, 0) + max(_int(parts) or 0, 0)
    if refused:
        lines.append("refused or clipped update parts (x in last rounds), by sender: " + ", ".join(
            f"{sender} {parts}" for sender, parts in sorted(refused.items(), key=lambda item: -item[1])[:8]))
    return lines


def _round_mark(entry: dict) -> str:
    """A round in a few characters: kind, outcome, group size (g3 ok, p2 partial, g! failed, g- alone)."""
    mark = {"complete": "", "partial": "~", "failed": "!", "alone": "-"}.get(entry.get("outcome"), "?")
    kind = _text(entry.get("kind", "?"), 1) or "?"
    mark += "x" if entry.get("refused") else ""  # parts of some peer refused or clipped (swarm/validation.py)
    return f"{kind}{mark}" if mark[:1] in ("!", "-", "?") else f"{kind}{_shown(_int(entry.get('group_size')))}{mark}"


def _int(value: object) -> int | None:
    """A whole number another peer sent, or None (missing, not a number, not finite, absurdly large)."""
    number = _float(value)
    return int(number) if number is not None and abs(number) < 1e15 else None


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return number if math.isfinite(number) else None


def _shown(value: float | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _text(value: object, width: int) -> str:
    """At most `width` printable characters of a value another peer sent (no terminal escape sequences)."""
    return "".join(ch for ch in str(value)[:4 * width] if ch.isprintable())[:width]


def print_invite(folder: Path, hours: float, address: str | None) -> int:
    from sdswarm.swarm.invites import join_command, load_swarm_key, make_invite
    from sdswarm.swarm.settings import load_settings

    if not hours > 0:
        print("error: --hours must be above 0", file=sys.stderr)
        return 2
    try:
        invite = make_invite(load_swarm_key(folder), hours)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if address is None:
        settings = load_settings(folder)
        host = settings.public_address or settings.listen_host
        host = "HOST" if host in ("0.0.0.0", "::") else host
        address = f"{host}:{settings.ie_port_external or settings.ie_port_internal}"
    print(f"# admits one peer, within {hours:g} hours; the joiner runs:\n{join_command(address, invite)}")
    return 0


def ban_peers(folder: Path, peer_ids: Sequence[str], *, lift: bool) -> int:
    from sdswarm.swarm.invites import ban

    try:
        banned = ban(folder, list(peer_ids), lift=lift)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"banned peers ({len(banned)}): {', '.join(sorted(banned)) or 'none'}; the running node spreads the list "
          "within seconds")
    return 0


def edit_settings(folder: Path, changes: Sequence[str]) -> int:
    from sdswarm.swarm.settings import load_settings, save_settings, update_settings

    settings = load_settings(folder)
    if changes:
        settings = update_settings(settings, parse_pairs(changes, "settings"))
        print(f"saved {save_settings(settings, folder)}")
    print(yaml.safe_dump(settings.model_dump(), sort_keys=False), end="")
    if not settings.client_mode:
        print(f"# announced DHT address: {', '.join(settings.dht_announce_maddrs()) or 'what it listens on'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
