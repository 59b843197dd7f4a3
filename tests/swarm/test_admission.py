"""Admission and signed records: invites, access tokens, the DHT's authorizer, the averagers' gate, bans, forged
records. Real DHTs on 127.0.0.1 in this process (seconds); test_admission_swarm.py runs real nodes."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref
from types import SimpleNamespace

import hivemind
import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from sdswarm.swarm.admission import Admission, Gate, SwarmAuthorizer, _post_admit, request_access
from sdswarm.swarm.invites import (
    Access,
    AdmissionError,
    Admitter,
    Bans,
    ban,
    issue_token,
    load_identity,
    load_or_create_swarm_key,
    make_invite,
    peer_id_of,
    read_invite,
)
from sdswarm.swarm.telemetry import PeerMetrics, metrics_key, publish, read_peers, wait_for_peers
from sdswarm.swarm.validation import CheckedDecentralizedAverager
from sdswarm.web.server import HttpServer, admit_routes


@pytest.fixture
def swarm(tmp_path):
    """A mother's DHT and an invited joiner's, in invite mode; both shut down after the test."""
    started = []

    def node(name: str, mother: bool = False, initial_peers=(), invite_from: Admission | None = None):
        folder = tmp_path / name
        folder.mkdir()
        if invite_from is not None:  # what POST /api/v1/admit does on the mother
            identity = load_identity(folder / "identity.key")
            answer = invite_from.admitter.admit({"invite": make_invite(invite_from.admitter.swarm_key),
                                                 "public_key": identity.get_public_key().to_bytes().decode()})
            Access.from_json(answer).save(folder)
        admission = Admission.for_node(access_mode="invite", run_id="t", folder=folder,
                                       identity_path=folder / "identity.key", mother=mother)
        dht = hivemind.DHT(start=True, initial_peers=list(initial_peers), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                           identity_path=str(folder / "identity.key"), **admission.dht_options())
        started.append(dht)
        admission.publish(dht)
        return admission, dht

    yield node
    for dht in started:
        dht.shutdown()


def test_invites_expire_name_their_swarm_and_admit_one_peer(tmp_path):
    key = RSAPrivateKey()
    assert read_invite(make_invite(key), key.get_public_key())["expires"] > time.time()
    with pytest.raises(AdmissionError, match="expired"):
        read_invite(make_invite(key, hours=-1), key.get_public_key())
    with pytest.raises(AdmissionError, match="not signed by this swarm"):
        read_invite(make_invite(RSAPrivateKey()), key.get_public_key())
    with pytest.raises(AdmissionError, match="damaged"):
        read_invite("not an invite", key.get_public_key())
    mother = Admission.for_node(access_mode="invite", run_id="t", folder=tmp_path, identity_path=tmp_path / "id",
                                mother=True)
    assert (tmp_path / "swarm.key").stat().st_mode & 0o777 == 0o600
    invite, first, second = make_invite(mother.admitter.swarm_key), RSAPrivateKey(), RSAPrivateKey()
    request = {"invite": invite, "public_key": first.get_public_key().to_bytes().decode()}
    assert mother.admitter.admit(request)["token"]
    assert mother.admitter.admit(request)["token"]  # the same peer again (a restart): admitted again
    with pytest.raises(AdmissionError, match="already admitted another peer"):
        mother.admitter.admit({**request, "public_key": second.get_public_key().to_bytes().decode()})
    with pytest.raises(AdmissionError, match="invited peers only"):
        Admission.for_node(access_mode="invite", run_id="t", folder=tmp_path / "j", identity_path=tmp_path / "j/id",
                           mother=False)


def test_only_admitted_peers_reach_the_dht_and_the_averagers_and_a_ban_drops_one(swarm, tmp_path, caplog):
    mother, mother_dht = swarm("mother", mother=True)
    maddrs = [str(a) for a in mother_dht.get_visible_maddrs()]
    joiner, joiner_dht = swarm("joiner", initial_peers=maddrs, invite_from=mother)
    assert joiner_dht.get(metrics_key("t"), latest=True) is None  # it talks to the mother: no error, no records yet

    # an outsider with a token of its own making: the mother's DHT does not answer, and says whom it refused
    folder = tmp_path / "outsider"
    identity, own_key = load_identity(folder / "identity.key"), RSAPrivateKey()
    access = Access(issue_token(own_key, identity.get_public_key()), own_key.get_public_key())
    with pytest.raises(RuntimeError, match="bootstrap failed"):
        hivemind.DHT(start=True, initial_peers=maddrs, identity_path=str(folder / "identity.key"),
                     authorizer=SwarmAuthorizer(identity, access, Bans(folder, own_key.get_public_key())))

    # the averagers' gate: the joiner's published token admits it, the outsider has none
    gate = mother.gate()

    async def admitted(peer_id: str) -> bool:
        return await gate.admits(mother_dht, PeerID.from_base58(peer_id), "download the training state")

    with caplog.at_level("WARNING", logger="sdswarm.swarm.admission"):
        assert asyncio.run(admitted(joiner.peer_id))
        assert not asyncio.run(admitted(access.token.username))
        assert f"refused peer {access.token.username}: it asked to download the training state" in caplog.text

        # a ban, signed by the swarm key, spreads through the DHT: every other peer refuses the banned one
        ban(mother.folder, [joiner.peer_id])
        mother.publish(mother_dht)
        assert not asyncio.run(admitted(joiner.peer_id))
        assert f"refused peer {joiner.peer_id}: it asked to download the training state, but it is banned" \
            in caplog.text
    with pytest.raises(AdmissionError, match="not a peer id"):
        ban(mother.folder, ["nonsense!"])


def test_records_are_signed_by_their_owner_and_forgeries_are_refused(swarm, caplog):
    mother, mother_dht = swarm("mother", mother=True)
    joiner, joiner_dht = swarm("joiner", initial_peers=[str(a) for a in mother_dht.get_visible_maddrs()],
                               invite_from=mother)
    publish(joiner_dht, "t", PeerMetrics(peer_id=joiner.peer_id, role="relay", data_slot=1, time=time.time()),
            joiner.owner)
    assert [(p.peer_id, p.data_slot) for p in read_peers(mother_dht, "t")] == [(joiner.peer_id, 1)]

    # the mother's node (any admitted peer) forges the joiner's metrics to take its data slot
    forged = PeerMetrics(peer_id=joiner.peer_id, role="relay", data_slot=3, time=time.time()).model_dump()
    expiration = get_dht_time() + 60
    assert mother_dht.store(metrics_key("t"), subkey=mother.owner, value=forged, expiration_time=expiration)
    assert not mother_dht.store(metrics_key("t"), subkey=joiner.owner, value=forged, expiration_time=expiration)
    assert not mother_dht.store(metrics_key("t"), subkey=joiner.peer_id, value=forged, expiration_time=expiration)
    assert not mother_dht.store("t_sdswarm_barrier", subkey=b"anyone", value=get_dht_time(),
                                expiration_time=expiration)
    with caplog.at_level("WARNING", logger="sdswarm.swarm.telemetry"):
        assert [(p.peer_id, p.data_slot) for p in read_peers(joiner_dht, "t")] == [(joiner.peer_id, 1)]
    assert f"claim to be peer {joiner.peer_id} but were signed by peer {mother.peer_id}" in caplog.text
    # the barrier counts each signer once
    assert wait_for_peers(joiner_dht, "t", joiner.owner, count=1, timeout=5) == 1
    assert wait_for_peers(mother_dht, "t", mother.owner, count=2, timeout=5) == 2
    assert json.loads((mother.folder / "access.json").read_text())["token"]


def test_the_averagers_serve_admitted_peers_only(swarm, caplog):
    mother, mother_dht = swarm("mother", mother=True)
    maddrs = [str(a) for a in mother_dht.get_visible_maddrs()]
    joiner, joiner_dht = swarm("joiner", initial_peers=maddrs, invite_from=mother)
    averager = CheckedDecentralizedAverager([torch.ones(8)], dht=mother_dht, prefix="t_state", gate=mother.gate(),
                                            start=True)
    try:
        async def ask(p2p: P2P) -> tuple[list[str], int]:
            stub = CheckedDecentralizedAverager.get_stub(p2p, mother_dht.peer_id, namespace="t_state")
            request = averaging_pb2.JoinRequest(schema_hash=b"x", expiration=get_dht_time() + 10)
            joined = [averaging_pb2.MessageCode.Name(m.code) async for m in await stub.rpc_join_group(request)]
            parts = [m async for m in await stub.rpc_download_state(averaging_pb2.DownloadRequest())]
            return joined, len(parts)

        async def as_outsider() -> tuple[str, tuple[list[str], int]]:
            p2p = await P2P.create(initial_peers=maddrs)
            try:
                return p2p.peer_id.to_base58(), await ask(p2p)
            finally:
                await p2p.shutdown()

        async def as_joiner() -> tuple[list[str], int]:
            return await ask(await joiner_dht.replicate_p2p())

        outsider_id, (joined, parts) = asyncio.run(as_outsider())
        assert joined == ["PROTOCOL_VIOLATION"] and parts == 0
        joined, parts = asyncio.run(as_joiner())
        assert joined != ["PROTOCOL_VIOLATION"] and parts > 0  # hivemind's own answer, and the state
    finally:
        averager.shutdown()


def test_a_stream_handler_asking_the_gate_is_not_collected_mid_round():
    """A tensor part's stream handler whose socket is paused is held by nothing but its wait for the DHT's answer,
    which hivemind holds weakly: uncollected, or the sender's part is lost and the round fails for the group."""

    class SlowDHT:
        def __init__(self) -> None:
            self.answers: list[weakref.ref] = []

        def get(self, key: str, latest: bool, return_future: bool) -> asyncio.Future:
            answer = asyncio.get_running_loop().create_future()
            self.answers.append(weakref.ref(answer))  # as hivemind's MPFuture registry: weakly
            return answer

    async def main() -> bool:
        dht = SlowDHT()
        gate = Gate("t", "me", SimpleNamespace(swarm_public_key=None), SimpleNamespace(peers=frozenset()),
                    refresh=0.02)
        handler = weakref.ref(asyncio.create_task(gate.admits(dht, PeerID(b"stranger"), "send a tensor part")))
        await asyncio.sleep(0)  # the gate asks the DHT
        gc.collect()
        task = handler()
        assert task is not None, "the handler was destroyed while it waited for the DHT"
        while not task.done():  # the members record never names the stranger
            for answer in filter(None, (ref() for ref in dht.answers)):
                if not answer.done():
                    answer.set_result(None)
            await asyncio.sleep(0.005)
        return task.result()

    assert asyncio.run(main()) is False


def test_a_relay_answers_invites_over_http(tmp_path):
    key = load_or_create_swarm_key(tmp_path)
    server = HttpServer(admit_routes(Admitter(key, tmp_path).admit), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.start()}"
    try:
        invite, first = make_invite(key), load_identity(tmp_path / "first.key")
        access = request_access(url, invite, first.get_public_key())
        assert access.token.username == peer_id_of(first.get_public_key())
        with pytest.raises(AdmissionError, match="refused the invite: this invite has already admitted another peer"):
            request_access(url, invite, RSAPrivateKey().get_public_key())
        with pytest.raises(AdmissionError, match="refused the invite: the invite was not signed by this swarm"):
            request_access(url, make_invite(RSAPrivateKey()), first.get_public_key())
        with pytest.raises(AdmissionError, match="refused the invite: send {"):
            _post_admit(url, "not an object")
    finally:
        server.stop()
