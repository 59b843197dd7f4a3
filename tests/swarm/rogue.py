"""A rogue peer for the admission test, a process of its own: `python -m tests.swarm.rogue RELAY RUN_ID FOLDER`.

Alone (an outsider): it joins the swarm's DHT with a token it signed itself, then asks the mother's averagers directly
to take it into a group and to send it the training state. With a fourth argument, an access.json the swarm issued
(an insider): it forges records, metrics in another peer's name and under another peer's key, and an unsigned
barrier entry. It prints what it got, as one JSON line."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import hivemind
from hivemind.averaging import DecentralizedAverager
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.auth import AccessToken
from hivemind.utils.crypto import RSAPrivateKey

from sdswarm.swarm.admission import Access, Admission, Bans, SwarmAuthorizer, issue_token, load_identity
from sdswarm.swarm.exchange import fetch_peers
from sdswarm.swarm.telemetry import metrics_key, read_peers


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
    p2p = await hivemind.P2P.create(initial_peers=maddrs, identity_path=str(folder / "identity.key"))
    mother = PeerID.from_base58(maddrs[0].rsplit("/p2p/", 1)[1])
    found: dict = {}
    try:
        stub = DecentralizedAverager.get_stub(p2p, mother, namespace=f"{run_id}_grad_averager")
        request = averaging_pb2.JoinRequest(schema_hash=b"x", expiration=get_dht_time() + 10, gather=b"")
        found["join_group"] = [averaging_pb2.MessageCode.Name(m.code) async for m in stub.rpc_join_group(request)]
        stub = DecentralizedAverager.get_stub(p2p, mother, namespace=f"{run_id}_state_averager")
        found["state_parts"] = len([m async for m in stub.rpc_download_state(averaging_pb2.DownloadRequest())])
    finally:
        await p2p.shutdown()
    return found


def insider(maddrs: list[str], run_id: str, folder: Path, token: str) -> dict:
    access = Access.from_json(json.loads(token))
    (folder / "access.json").write_text(token)
    admission = Admission.for_node(access_mode="invite", run_id=run_id, folder=folder,
                                   identity_path=folder / "identity.key", mother=False)
    dht = hivemind.DHT(initial_peers=maddrs, identity_path=str(folder / "identity.key"), start=True,
                       **admission.dht_options())
    admission.publish(dht)
    victim = next(p for p in read_peers(dht, run_id) if p.role != "mother")
    entries = dht.get(metrics_key(run_id), latest=True).value
    victim_owner = next(k for k, v in entries.items() if isinstance(v.value, dict)
                        and v.value.get("peer_id") == victim.peer_id)
    forged = {**victim.model_dump(), "data_slot": 3, "loss": 0.0, "time": get_dht_time()}
    expiration = get_dht_time() + 60
    result = {
        "peer_id": admission.peer_id, "victim": victim.peer_id, "access": isinstance(access.token, AccessToken),
        # its own key, another peer's name: stored (it is its record), ignored by every reader
        "own_key_other_name": dht.store(metrics_key(run_id), subkey=admission.owner, value=forged,
                                        expiration_time=expiration),
        # the victim's key: the record cannot carry the victim's signature, the DHT refuses it
        "victims_key": dht.store(metrics_key(run_id), subkey=victim_owner, value=forged, expiration_time=expiration),
        # a barrier entry without an owner: the schema refuses it
        "unsigned_barrier": dht.store(f"{run_id}_sdswarm_barrier", subkey=b"someone", value=get_dht_time(),
                                      expiration_time=expiration),
    }
    result["victims_record_intact"] = all(p.data_slot != 3 for p in read_peers(dht, run_id))
    dht.shutdown()
    return result


def main() -> None:
    relay, run_id, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    folder.mkdir(parents=True, exist_ok=True)
    maddrs = fetch_peers(relay)
    result = outsider(maddrs, run_id, folder) if len(sys.argv) == 4 else insider(maddrs, run_id, folder, sys.argv[4])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
