"""The swarm's signed documents: its key, invites, access tokens and ban lists (no network; swarm/admission.py uses
them). The mother makes the key; an invite admits one peer for a while; an access token (hivemind's AccessToken) names
a peer id and its identity key, signed by the swarm key; a ban list is signed by it too."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.auth import AccessToken
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from sdswarm.atomic import write_atomic
from sdswarm.config import ConfigError

log = logging.getLogger(__name__)

SWARM_KEY_FILE = "swarm.key"  # the swarm's private key (PEM): on the mother, and on relays that may admit
ACCESS_FILE = "access.json"  # this node's access token and the swarm's public key
BANS_FILE = "bans.json"  # the newest signed ban list this node has seen
INVITES_FILE = "invites.json"  # on a node that admits: the peer each invite admitted (an invite admits one)
INVITE_HOURS = 24.0
ACCESS_DAYS = 365.0  # an access token's life; bans, not expiry, take a peer out


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
    return PeerID(b"\x12\x20" + hashlib.sha256(encoded).digest()).to_base58()  # a sha2-256 multihash


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


def join_command(address: str, invite: str) -> str:
    return f"python server.py -j {address} --invite {invite}"
