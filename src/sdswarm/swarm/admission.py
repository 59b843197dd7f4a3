"""Who may join the swarm (`swarm.access: invite`): the DHT's authorizer, the check of the averaging RPCs that
hivemind's authorizer does not cover, the members and ban records, and a node's admission from start to stop (the
signed documents themselves, key, invites, tokens and ban lists, are swarm/invites.py's).

- The mother makes the swarm's key pair (OUTPUT/swarm.key, 0600). Whoever holds that file admits peers: the mother,
  and any relay its owner copies the file to (a co-admin). No other node ever sees the private key.
- An *invite* (`sdswarm invite`, or the UI with the admin token) is signed by the swarm key and expires; it names
  the swarm by its key's fingerprint. It admits one peer: the first that presents it.
- A joiner presents the invite with its public key to the relay it joins through (POST /api/v1/admit); a relay
  holding the swarm key answers with an *access token*: hivemind's AccessToken for the joiner's peer id and public
  key (its libp2p identity key), signed by the swarm key. The joiner keeps it (OUTPUT/access.json) and rejoins
  with it after a restart, without a new invite.
- Every DHT request and answer carries the sender's token and is signed with its identity key (hivemind's
  TokenAuthorizerBase): a peer without a token signed by the swarm key, or banned, gets no answer.
- Each peer publishes its token in the DHT (the members record); the averagers admit group joins, tensor parts and
  state downloads only from peers with a valid token there (P2PContext.remote_id), and never from banned peers.
- A ban list is signed by the swarm key (`sdswarm ban`, or the UI); every node keeps the newest it has seen
  (OUTPUT/bans.json) and publishes it again, so it spreads to every peer, also while the mother is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, AsyncIterator  # noqa: UP035 (hivemind reads typing.AsyncIterator in RPC annotations)

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.auth import AccessToken, TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.timed_storage import get_dht_time
from pydantic import v1 as pydantic_v1

from sdswarm.swarm.invites import (
    ACCESS_FILE,
    SWARM_KEY_FILE,
    Access,
    AdmissionError,
    Admitter,
    Bans,
    issue_token,
    load_identity,
    load_or_create_swarm_key,
    peer_id_of,
    read_invite,
    token_problem,
)
from sdswarm.swarm.network import held_task

log = logging.getLogger(__name__)

ADMIT_PATH = "/api/v1/admit"
PUBLISH_PERIOD = 10.0  # seconds between a node's membership and ban-list records
RECORD_LIFE = 60.0


# --- the DHT --------------------------------------------------------------------------------------------------------


class SwarmAuthorizer(TokenAuthorizerBase):
    """hivemind's moderated-network protocol: every DHT request and answer carries an access token signed by the swarm
    key for the sender's own identity key, and is signed with that key. Refusals are logged naming the peer."""

    def __init__(self, identity: RSAPrivateKey, access: Access, bans: Bans) -> None:
        super().__init__(identity)
        self.access, self.bans = access, bans
        self._logged: dict[tuple[str, str], float] = {}

    async def get_token(self) -> AccessToken:
        return self.access.token

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False  # a year's token; a peer is taken out by a ban

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return self.problem(access_token) is None

    def problem(self, token: AccessToken) -> str | None:
        problem = token_problem(token, self.access.swarm_public_key)
        if problem is None and token.username in self.bans.peers:
            return "a banned peer"
        return problem

    async def validate_request(self, request) -> bool:
        if await super().validate_request(request):
            return True
        self._refused("a DHT request", request.auth.client_access_token)
        return False

    async def validate_response(self, response, request) -> bool:
        if await super().validate_response(response, request):
            return True
        self._refused("a DHT answer", response.auth.service_access_token)
        return False

    def _refused(self, what: str, token: AccessToken) -> None:
        peer, why = token.username or "(unnamed)", self.problem(token) or "a request not signed by its token's key"
        now = time.monotonic()
        if now - self._logged.get((peer, why), -60.0) >= 60.0:  # once a minute per peer and reason
            self._logged[(peer, why)] = now
            log.warning("refused %s from peer %s: %s", what, peer, why)


# --- members and the averagers' check --------------------------------------------------------------------------------


class AdmissionRecords(pydantic_v1.BaseModel):
    """The DHT records admission keeps (SchemaValidator, prefix run_id): each peer's own subkey, signed by it."""

    sdswarm_members: dict[BytesWithPublicKey, pydantic_v1.StrictBytes]  # its access token
    sdswarm_bans: dict[BytesWithPublicKey, pydantic_v1.StrictBytes]  # the newest ban list it has seen


def admission_validator(run_id: str) -> SchemaValidator:
    return SchemaValidator(AdmissionRecords, prefix=run_id)


def members_key(run_id: str) -> str:
    return f"{run_id}_sdswarm_members"


def bans_key(run_id: str) -> str:
    return f"{run_id}_sdswarm_bans"


def read_members(entries: Any, swarm_public_key: RSAPublicKey) -> set[str]:
    """The peer ids whose published access token this swarm's key signed."""
    members = set()
    for item in (entries.value.values() if entries is not None and isinstance(entries.value, dict) else ()):
        with contextlib.suppress(Exception):  # a peer's word is never trusted blindly
            token = AccessToken.FromString(item.value)
            if token_problem(token, swarm_public_key) is None:
                members.add(token.username)
    return members


MEMBER_LOOKUPS = 3  # reads of the members record before an unknown peer is refused (about `refresh` seconds)
MEMBER_LOOKUP_TIMEOUT = 10.0  # seconds


class Gate:
    """Whether a peer may take part in this node's averaging rounds and state downloads: a valid access token in the
    members record, and not banned. Runs in the averagers' processes (reads the DHT through them)."""

    def __init__(self, run_id: str, own_peer_id: str, access: Access, bans: Bans, refresh: float = 2.0) -> None:
        self.run_id, self.own_peer_id, self.access, self.bans = run_id, own_peer_id, access, bans
        self.refresh, self._members, self._read_at = refresh, set(), -1e9
        self._logged: dict[str, float] = {}

    async def admits(self, dht: hivemind.DHT, peer: PeerID, what: str) -> bool:
        # a stream handler whose socket is paused (a tensor part waiting in its buffer) is held by nothing but its wait
        # for the DHT's answer: unheld, the first rounds with a new peer lost its part and failed
        with held_task():
            return await self._admits(dht, peer, what)

    async def _admits(self, dht: hivemind.DHT, peer: PeerID, what: str) -> bool:
        peer_id = peer.to_base58()
        if peer_id in self.bans.peers:
            return self._refuse(peer_id, what, "banned")
        # a peer that just joined may ask before its members record reached this node: look again, a few times
        for attempt in range(MEMBER_LOOKUPS):
            if peer_id == self.own_peer_id or peer_id in self._members:
                return True
            if attempt:
                await asyncio.sleep(self.refresh / 2)
            if time.monotonic() - self._read_at >= self.refresh / 4:  # bounded reads, whoever asks
                self._read_at = time.monotonic()
                with contextlib.suppress(asyncio.TimeoutError):  # a DHT that never answers: look again
                    found = await asyncio.wait_for(dht.get(members_key(self.run_id), latest=True, return_future=True),
                                                   MEMBER_LOOKUP_TIMEOUT)
                    self._members = read_members(found, self.access.swarm_public_key)
        return peer_id in self._members or self._refuse(peer_id, what, "not admitted (no valid access token)")

    def _refuse(self, peer_id: str, what: str, why: str) -> bool:
        now = time.monotonic()
        if now - self._logged.get(peer_id + what, -60.0) >= 60.0:
            self._logged[peer_id + what] = now
            log.warning("refused peer %s: it asked to %s, but it is %s", peer_id, what, why)
        return False


class GatedRPCs:
    """Mixin for hivemind's averagers: their RPCs from other peers pass the Gate first (none in an open swarm)."""

    def __init__(self, *args, gate: Gate | None = None, **kwargs) -> None:
        self.gate = gate  # set before hivemind forks the averager's process
        super().__init__(*args, **kwargs)

    async def _refuses(self, context: P2PContext, what: str) -> bool:
        return self.gate is not None and not await self.gate.admits(self.dht, context.remote_id, what)

    # hivemind registers RPC handlers by their type annotations: these keep hivemind's own
    async def rpc_join_group(self, request: averaging_pb2.JoinRequest,
                             context: P2PContext) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if await self._refuses(context, f"join an averaging group ({self.prefix})"):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
        if await self._refuses(context, f"send a tensor part ({self.prefix})"):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest,
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        if await self._refuses(context, f"download the training state ({self.prefix})"):
            return
        async for message in super().rpc_download_state(request, context):
            yield message



# --- a node's admission, from start to stop ------------------------------------------------------------------------


class Admission:
    """One node's part in admission: the DHT's authorizer and validators, the averagers' gate, and the thread that
    publishes its membership and the ban list. In an open swarm (`access: open`) only the signed records remain."""

    def __init__(self, *, run_id: str, folder: Path, identity: RSAPrivateKey, access: Access | None,
                 admitter: Admitter | None = None) -> None:
        self.run_id, self.folder, self.identity, self.access, self.admitter = run_id, folder, identity, access, admitter
        self.peer_id = peer_id_of(identity.get_public_key())
        self.bans = Bans(folder, access.swarm_public_key) if access else None
        self._banned: frozenset[str] = frozenset()  # the bans this node has logged
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_node(cls, *, access_mode: str, run_id: str, folder: Path, identity_path: Path, mother: bool,
                 invite: str | None = None, relay: str | None = None) -> Admission:
        """The mother makes the swarm key; a node holding it (a co-admin relay) admits too; a joiner uses its saved
        access token or, presenting `invite` to `relay`, gets one."""
        identity = load_identity(identity_path)
        if access_mode == "open":
            return cls(run_id=run_id, folder=folder, identity=identity, access=None)
        admitter = None
        if mother or (folder / SWARM_KEY_FILE).exists():
            swarm_key = load_or_create_swarm_key(folder)
            admitter = Admitter(swarm_key, folder)
            access = Access.load(folder)
            if access is None or token_problem(access.token, swarm_key.get_public_key()) is not None \
                    or access.token.username != peer_id_of(identity.get_public_key()):
                access = Access(issue_token(swarm_key, identity.get_public_key()), swarm_key.get_public_key())
                access.save(folder)
        elif invite is not None:
            if relay is None:
                raise AdmissionError("an invite is presented to a relay: join with -j ADDRESS --invite INVITE")
            access = request_access(relay, invite, identity.get_public_key())
            access.save(folder)
        else:
            access = Access.load(folder)
            if access is None:
                raise AdmissionError("this swarm admits invited peers only (swarm.access: invite): ask its mother for "
                                     "an invite (sdswarm invite) and join with the command it prints")
        problem = token_problem(access.token, access.swarm_public_key)
        if problem is not None:
            raise AdmissionError(f"{folder / ACCESS_FILE} holds {problem}: join again with a new invite")
        return cls(run_id=run_id, folder=folder, identity=identity, access=access, admitter=admitter)

    def dht_options(self) -> dict[str, Any]:
        """The DHT's authorizer and validators (records signed by this node's identity: the owner is the signer)."""
        from sdswarm.swarm.telemetry import records_validator  # telemetry reads signers' peer ids from here

        validators = [RSASignatureValidator(self.identity), records_validator(self.run_id),
                      admission_validator(self.run_id)]
        authorizer = SwarmAuthorizer(self.identity, self.access, self.bans) if self.access else None
        return dict(authorizer=authorizer, record_validators=validators)

    @property
    def owner(self) -> bytes:
        """This node's subkey in signed records: hivemind's [owner:KEY] marker of its identity key."""
        return RSASignatureValidator(self.identity).local_public_key

    def gate(self) -> Gate | None:
        return Gate(self.run_id, self.peer_id, self.access, self.bans) if self.access else None

    def start(self, dht: hivemind.DHT) -> None:
        if self.access is None:
            return
        self._thread = threading.Thread(target=self._publish_forever, args=(dht,), name="admission", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=PUBLISH_PERIOD + 5)

    def _publish_forever(self, dht: hivemind.DHT) -> None:
        while not self._halt.is_set():
            try:
                self.publish(dht)
            except Exception as exc:  # admission records must never take training down
                log.debug("could not publish admission records: %s", exc)
            self._halt.wait(PUBLISH_PERIOD)

    def publish(self, dht: hivemind.DHT) -> None:
        """This node's token in the members record; the newest ban list anyone published, kept and passed on."""
        expiration = get_dht_time() + RECORD_LIFE
        dht.store(members_key(self.run_id), subkey=self.owner, value=self.access.token.SerializeToString(),
                  expiration_time=expiration)
        found = dht.get(bans_key(self.run_id), latest=True)
        for item in (found.value.values() if found is not None and isinstance(found.value, dict) else ()):
            self.bans.offer(item.value)
        banned = self.bans.peers
        if banned - self._banned:  # from the DHT, or `sdswarm ban` beside this node
            log.warning("banned from the swarm: %s", ", ".join(sorted(banned - self._banned)))
        self._banned = banned
        blob = self.bans.blob()
        if blob is not None:
            dht.store(bans_key(self.run_id), subkey=self.owner, value=blob, expiration_time=expiration)


def _post_admit(relay_url: str, request: Any, timeout: float = 15.0) -> dict[str, Any]:
    """POST an admission request to a relay; its answer, or AdmissionError saying why not."""
    import asyncio

    import aiohttp

    async def post() -> tuple[int, Any]:
        async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                    session.post(relay_url + ADMIT_PATH, json=request) as response):
            return response.status, json.loads(await response.content.read(1 << 16))

    try:
        status, answer = asyncio.run(post())
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        raise AdmissionError(f"the relay at {relay_url} did not answer the invite ({exc or type(exc).__name__})"
                             ) from None
    if status != 200 or not isinstance(answer, dict):
        error = answer.get("error") if isinstance(answer, dict) else None
        raise AdmissionError(f"the relay at {relay_url} refused the invite: {str(error or status)[:300]}")
    return answer


def forward_admit(request: Any, admitting_relays: Callable[[], list[str]]) -> dict[str, Any]:
    """A relay without the swarm key passes a joiner's invite to one that holds it (the mother): any relay is an entry
    point. It cannot forge the answer: the joiner checks the token against the invite's swarm."""
    addresses = admitting_relays()
    for address in addresses:
        url = address if address.startswith(("http://", "https://")) else f"http://{address}"
        try:
            return _post_admit(url, request)
        except AdmissionError as exc:
            if "refused" in str(exc):
                raise
            log.info("could not pass an invite on to %s (%s)", address, exc)
    raise AdmissionError("this relay holds no swarm key, and no relay that does (the mother) answers now: join "
                         "through the mother's address, or later")


def request_access(relay_url: str, invite: str, public_key: RSAPublicKey) -> Access:
    """Present `invite` to the relay at `relay_url` for this node's key; the access token it answers, checked."""
    answer = _post_admit(relay_url, {"invite": invite, "public_key": public_key.to_bytes().decode()})
    try:
        access = Access.from_json(answer)
    except (ValueError, KeyError, TypeError):
        raise AdmissionError(f"the relay at {relay_url} answered the invite with something this version cannot "
                             "read") from None
    read_invite(invite, access.swarm_public_key)  # the relay's swarm is the invite's: else it is not our swarm
    problem = token_problem(access.token, access.swarm_public_key)
    if problem is not None or access.token.username != peer_id_of(public_key):
        raise AdmissionError(f"the relay at {relay_url} answered the invite with {problem or 'another peer'}'s token")
    return access
