"""An uninvited peer for the admission test, a process of its own: `python -m tests.swarm.outsider RELAY RUN_ID FOLDER`.

It joins the swarm's DHT with a token it signed itself, then asks the mother's averagers directly (over libp2p,
skipping the DHT) to take it into a group and to send it the training state. It prints what it got, as JSON."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import hivemind
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from sdswarm.swarm.admission import SwarmAuthorizer
from sdswarm.swarm.exchange import fetch_peers
from sdswarm.swarm.invites import Access, Bans, issue_token, load_identity
from sdswarm.swarm.telemetry import metrics_key


def outsider(maddrs: list[str], run_id: str, folder: Path) -> dict:
    identity = load_identity(folder / "identity.key")
    own_swarm = RSAPrivateKey()  # a swarm key of its own: its token is well formed, but not this swarm's
    access = Access(issue_token(own_swarm, identity.get_public_key()), own_swarm.get_public_key())
    result: dict = {"peer_id": access.token.username}
    try:
        dht = hivemind.DHT(initial_peers=maddrs, identity_path=str(folder / "identity.key"), start=True,
                           authorizer=SwarmAuthorizer(identity, access, Bans(folder, own_swarm.get_public_key())))
        result["dht_records"] = dht.get(metrics_key(run_id), latest=True) is not None
        dht.shutdown()
    except Exception as exc:  # hivemind: no initial peer answered
        result["dht_error"] = repr(exc)[:200]
    result.update(asyncio.run(ask_averagers(maddrs, run_id, folder)))
    return result


async def ask_averagers(maddrs: list[str], run_id: str, folder: Path) -> dict:
    """Call the mother's averaging RPCs over a bare libp2p connection, as a peer that skips the DHT would."""
    # the same identity as its refused DHT, which the mother may still see connected
    p2p = await P2P.create(initial_peers=maddrs, identity_path=str(folder / "identity.key"),
                                    check_if_identity_free=False)
    mother = PeerID.from_base58(maddrs[0].rsplit("/p2p/", 1)[1])
    found: dict = {}
    try:
        # sdswarm's averagers keep hivemind's handler names (swarm/validation.py: CheckedAveraging)
        stub = GradientAverager.get_stub(p2p, mother, namespace=f"{run_id}_grad_averager")
        request = averaging_pb2.JoinRequest(schema_hash=b"x", expiration=get_dht_time() + 10, gather=b"")
        found["join_group"] = [averaging_pb2.MessageCode.Name(m.code) async for m in await stub.rpc_join_group(request)]
        stub = TrainingStateAverager.get_stub(p2p, mother, namespace=f"{run_id}_state_averager")
        found["state_parts"] = len([m async for m in await stub.rpc_download_state(averaging_pb2.DownloadRequest())])
    finally:
        await p2p.shutdown()
    return found


def main() -> None:
    relay, run_id, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    folder.mkdir(parents=True, exist_ok=True)
    maddrs = fetch_peers(relay)
    print(json.dumps(outsider(maddrs, run_id, folder)), flush=True)


if __name__ == "__main__":
    main()
