"""Who may join the swarm (`swarm.access: invite`): the swarm's key, invitations, access tokens, the DHT's
authorizer, bans, and the check of the averaging RPCs that hivemind's authorizer does not cover.

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

import base64
import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hivemind
import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.averaging import DecentralizedAverager
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2, crypto_pb2
from hivemind.utils.auth import AccessToken, TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.timed_storage import get_dht_time
from pydantic import v1 as pydantic_v1

from sdswarm.atomic import write_atomic
from sdswarm.config import ConfigError

log = logging.getLogger(__name__)

SWARM_KEY_FILE = "swarm.key"  # the swarm's private key (PEM): on the mother, and on relays that may admit
ACCESS_FILE = "access.json"  # this node's access token and the swarm's public key
BANS_FILE = "bans.json"  # the newest signed ban list this node has seen
INVITES_FILE = "invites.json"  # on a node that admits: the peer each invite admitted (an invite admits one)
ADMIT_PATH = "/api/v1/admit"
INVITE_HOURS = 24.0
ACCESS_DAYS = 365.0  # an access token's life; bans, not expiry, take a peer out
PUBLISH_PERIOD = 10.0  # seconds between a node's membership and ban-list records
RECORD_LIFE = 60.0


class AdmissionError(ConfigError):
    """An invite, access token or swarm key that this node cannot use; the message says why and what to do."""


# --- keys -------------------------------------------------------------------------------------------------------


def load_identity(path: Path) -> RSAPrivateKey:
    """This node's libp2p identity (OUTPUT/identity.key, made now if missing): it signs its DHT requests and records,
    and its public key names its peer id, so an access token for the key admits exactly that peer."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": crypto_pb2.PrivateKey.FromString(path.read_bytes()).data})
    return key


def peer_id_of(public_key: RSAPublicKey) -> str:
    """The libp2p peer id of an RSA identity key (as PeerID.from_identity computes it from the private key)."""
    der = public_key._public_key.public_bytes(encoding=serialization.Encoding.DER,
                                              format=serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def load_or_create_swarm_key(folder: Path) -> RSAPrivateKey:
    """The swarm's private key in `folder/swarm.key`; made there (0600, atomically) by the mother's first start."""
    path = Path(folder) / SWARM_KEY_FILE
    if path.exists():
        return load_swarm_key(folder)
    key = RSAPrivateKey()
    pem = key._private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    write_atomic(path, pem, durable=True, mode=0o600)
    log.info("made the swarm's key pair (%s; fingerprint %s): keep it private, it admits peers",
             path, fingerprint(key.get_public_key()))
    return key


def load_swarm_key(folder: Path) -> RSAPrivateKey:
    path = Path(folder) / SWARM_KEY_FILE
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise AdmissionError(f"{path} does not exist: only the mother's output folder (or a relay given a copy of "
                             "its swarm.key) holds the swarm's key") from None
    except ValueError as exc:
        raise AdmissionError(f"{path} is not a PEM private key ({exc}): restore it from a backup") from None
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = loaded
    return key


def fingerprint(public_key: RSAPublicKey) -> str:
    return hashlib.sha256(public_key.to_bytes()).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- invites and access tokens -----------------------------------------------------------------------------------


def make_invite(swarm_key: RSAPrivateKey, hours: float = INVITE_HOURS) -> str:
    """A signed invite that admits one peer within `hours`."""
    payload = json.dumps({"swarm": fingerprint(swarm_key.get_public_key()), "expires": time.time() + hours * 3600,
                          "id": secrets.token_hex(8)}, separators=(",", ":")).encode()
    return f"{_b64(payload)}.{_b64(base64.b64decode(swarm_key.sign(payload)))}"


def read_invite(invite: str, swarm_public_key: RSAPublicKey) -> dict[str, Any]:
    """The invite's payload, if this swarm's key signed it and it has not expired; AdmissionError otherwise."""
    try:
        payload_text, signature = invite.strip().split(".")
        payload = _unb64(payload_text)
        data = json.loads(payload)
        signed = swarm_public_key.verify(payload, base64.b64encode(_unb64(signature)))
    except (ValueError, TypeError, UnicodeDecodeError):
        raise AdmissionError("the invite is damaged: copy the whole join command its mother printed") from None
    if not signed or not isinstance(data, dict) or data.get("swarm") != fingerprint(swarm_public_key):
        raise AdmissionError("the invite was not signed by this swarm's key: ask this swarm's mother for one "
                             "(sdswarm invite)")
    if not isinstance(data.get("expires"), float | int) or data["expires"] < time.time():
        raise AdmissionError("the invite has expired: ask the swarm's mother for a new one (sdswarm invite)")
    return data


def _signed_part(token: AccessToken) -> bytes:
    return f"{token.username} {token.public_key.decode(errors='replace')} {token.expiration_time}".encode()


def issue_token(swarm_key: RSAPrivateKey, public_key: RSAPublicKey, days: float = ACCESS_DAYS) -> AccessToken:
    """An access token for the peer whose identity key is `public_key`, signed by the swarm key."""
    token = AccessToken(username=peer_id_of(public_key), public_key=public_key.to_bytes(),
                        expiration_time=str(time.time() + days * 86400))
    token.signature = swarm_key.sign(_signed_part(token))
    return token


def token_problem(token: AccessToken, swarm_public_key: RSAPublicKey) -> str | None:
    """Why `token` does not admit its peer (None: it does)."""
    if not token.signature:
        return "no access token (not invited)"
    if not swarm_public_key.verify(_signed_part(token), token.signature):
        return "an access token this swarm's key did not sign"
    try:
        if peer_id_of(RSAPublicKey.from_bytes(token.public_key)) != token.username:
            return "an access token whose key is not its peer id's"
        expired = float(token.expiration_time) < time.time()
    except ValueError:
        return "a malformed access token"
    return "an expired access token" if expired else None


@dataclass
class Access:
    """What a node in an invite-only swarm holds: its access token and the swarm's public key."""

    token: AccessToken
    swarm_public_key: RSAPublicKey

    def save(self, folder: Path) -> None:
        data = {"token": _b64(self.token.SerializeToString()),
                "swarm_public_key": self.swarm_public_key.to_bytes().decode()}
        write_atomic(Path(folder) / ACCESS_FILE, json.dumps(data).encode(), durable=True, mode=0o600)

    @classmethod
    def load(cls, folder: Path) -> Access | None:
        path = Path(folder) / ACCESS_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            return cls.from_json(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise AdmissionError(f"{path} is damaged ({exc}): delete it and join again with a new invite") from None

    @classmethod
    def from_json(cls, data: dict) -> Access:
        return cls(AccessToken.FromString(_unb64(data["token"])),
                   RSAPublicKey.from_bytes(data["swarm_public_key"].encode()))


class Admitter:
    """Answers invites on a node that holds the swarm key: an access token for the presenting peer's key. An invite
    admits the first peer that presents it (that peer may present it again: a joiner that restarted)."""

    def __init__(self, swarm_key: RSAPrivateKey, folder: Path) -> None:
        self.swarm_key, self.path = swarm_key, Path(folder) / INVITES_FILE
        self._lock = threading.Lock()

    def admit(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or not all(isinstance(request.get(k), str) for k in ("invite", "public_key")):
            raise AdmissionError("send {\"invite\": INVITE, \"public_key\": the joiner's identity key (OpenSSH)}")
        invite = read_invite(request["invite"], self.swarm_key.get_public_key())
        try:
            public_key = RSAPublicKey.from_bytes(request["public_key"].encode())
        except ValueError:
            raise AdmissionError("public_key is not an RSA public key in OpenSSH format") from None
        peer_id = peer_id_of(public_key)
        with self._lock:
            used = json.loads(self.path.read_text()) if self.path.exists() else {}
            if used.setdefault(invite["id"], peer_id) != peer_id:
                raise AdmissionError("this invite has already admitted another peer: ask the mother for a new one")
            write_atomic(self.path, json.dumps(used).encode(), mode=0o600)
        log.info("admitted peer %s with invite %s", peer_id, invite["id"])
        token = issue_token(self.swarm_key, public_key)
        return {"token": _b64(token.SerializeToString()),
                "swarm_public_key": self.swarm_key.get_public_key().to_bytes().decode()}


# --- bans ---------------------------------------------------------------------------------------------------------


def sign_bans(swarm_key: RSAPrivateKey, peers: set[str]) -> bytes:
    payload = json.dumps({"peers": sorted(peers), "time": time.time()}, separators=(",", ":")).encode()
    return json.dumps({"list": payload.decode(), "signature": swarm_key.sign(payload).decode()}).encode()


def read_bans(blob: Any, swarm_public_key: RSAPublicKey) -> tuple[float, frozenset[str]] | None:
    """(signing time, banned peer ids) of a ban list this swarm's key signed; None for anything else."""
    try:
        outer = json.loads(blob)
        payload = outer["list"].encode()
        if not swarm_public_key.verify(payload, outer["signature"].encode()):
            return None
        data = json.loads(payload)
        return float(data["time"]), frozenset(str(p) for p in data["peers"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class Bans:
    """The newest ban list this node has seen, in OUTPUT/bans.json: read by every process of the node (the DHT's
    authorizer, the averagers) and updated by the node's publisher."""

    def __init__(self, folder: Path, swarm_public_key: RSAPublicKey) -> None:
        self.path, self.swarm_public_key = Path(folder) / BANS_FILE, swarm_public_key
        self._seen: tuple[float, float, frozenset[str]] = (-1.0, 0.0, frozenset())  # file mtime, list time, peers

    def current(self) -> tuple[float, frozenset[str]]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0, frozenset()
        if mtime != self._seen[0]:
            found = read_bans(self.path.read_bytes(), self.swarm_public_key)
            self._seen = (mtime, *(found or (0.0, frozenset())))
        return self._seen[1], self._seen[2]

    @property
    def peers(self) -> frozenset[str]:
        return self.current()[1]

    def blob(self) -> bytes | None:
        return self.path.read_bytes() if self.current()[0] else None

    def offer(self, blob: Any) -> bool:
        """Keep `blob` if it is a ban list this swarm signed, newer than ours; True if it was kept."""
        found = read_bans(blob, self.swarm_public_key)
        if found is None or found[0] <= self.current()[0]:
            return False
        write_atomic(self.path, blob)
        newly = found[1] - self._seen[2]
        if newly:
            log.warning("banned from the swarm: %s", ", ".join(sorted(newly)))
        return True


def ban(folder: Path, peer_ids: list[str], *, lift: bool = False) -> frozenset[str]:
    """Add (or with `lift`, remove) peers to the ban list kept in `folder` (which holds the swarm key); the running
    node publishes it to the swarm within seconds. The banned peers after the change."""
    key = load_swarm_key(folder)
    bans = Bans(folder, key.get_public_key())
    for peer_id in peer_ids:
        try:
            PeerID.from_base58(peer_id)
        except ValueError:
            raise AdmissionError(f"{peer_id!r} is not a peer id (the base58 name `sdswarm status` shows)") from None
    peers = bans.peers - set(peer_ids) if lift else bans.peers | set(peer_ids)
    bans.offer(sign_bans(key, set(peers)))
    return bans.peers


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


class Gate:
    """Whether a peer may take part in this node's averaging rounds and state downloads: a valid access token in the
    members record, and not banned. Runs in the averagers' processes (reads the DHT through them)."""

    def __init__(self, run_id: str, own_peer_id: str, access: Access, bans: Bans, refresh: float = 2.0) -> None:
        self.run_id, self.own_peer_id, self.access, self.bans = run_id, own_peer_id, access, bans
        self.refresh, self._members, self._read_at = refresh, set(), -1e9
        self._logged: dict[str, float] = {}

    async def admits(self, dht: hivemind.DHT, peer: PeerID, what: str) -> bool:
        peer_id = peer.to_base58()
        if peer_id in self.bans.peers:
            return self._refuse(peer_id, what, "banned")
        if peer_id == self.own_peer_id or peer_id in self._members:
            return True
        if time.monotonic() - self._read_at >= self.refresh:  # a peer that just joined: look again
            self._read_at = time.monotonic()
            found = await dht.get(members_key(self.run_id), latest=True, return_future=True)
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

    async def rpc_join_group(self, request, context: P2PContext) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if await self._refuses(context, f"join an averaging group ({self.prefix})"):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    async def rpc_aggregate_part(self, stream, context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
        if await self._refuses(context, f"send a tensor part ({self.prefix})"):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(self, request, context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        if await self._refuses(context, f"download the training state ({self.prefix})"):
            return
        async for message in super().rpc_download_state(request, context):
            yield message


class GatedAverager(GatedRPCs, DecentralizedAverager):
    pass


class GatedGradientAverager(GatedRPCs, GradientAverager):
    pass


class GatedStateAverager(GatedRPCs, TrainingStateAverager):
    pass


# --- a node's admission, from start to stop ------------------------------------------------------------------------


class Admission:
    """One node's part in admission: the DHT's authorizer and validators, the averagers' gate, and the thread that
    publishes its membership and the ban list. In an open swarm (`access: open`) only the signed records remain."""

    def __init__(self, *, run_id: str, folder: Path, identity: RSAPrivateKey, access: Access | None,
                 admitter: Admitter | None = None) -> None:
        self.run_id, self.folder, self.identity, self.access, self.admitter = run_id, folder, identity, access, admitter
        self.peer_id = peer_id_of(identity.get_public_key())
        self.bans = Bans(folder, access.swarm_public_key) if access else None
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


def join_command(address: str, invite: str) -> str:
    return f"python server.py -j {address} --invite {invite}"
