"""The admin token: settings and controls need it, the read-only dashboard does not.

Generated at a node's first start and kept in its own file (`admin_token`, mode 0600) beside the node
settings, never inside node.yaml: that file is meant to be read, copied and shown, so it holds no secret.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

from sdswarm.atomic import write_atomic

TOKEN_FILE = "admin_token"
_MIN_LENGTH = 16  # a hand-edited token shorter than this is too easy to guess


def load_or_create_token(folder: Path) -> str:
    """The token in `folder/admin_token`; a new random one written there (0600) if there is none."""
    folder = Path(folder)
    path = folder / TOKEN_FILE
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
        if len(token) >= _MIN_LENGTH:
            _restrict(path)
            return token
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # created 0600 from the start: the token is never readable by others, not even for a moment
    write_atomic(path, (token + "\n").encode(), durable=True, mode=0o600)
    return token


def _restrict(path: Path) -> None:
    """A token file someone copied in with looser permissions is tightened, not trusted as is."""
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time: the answer's timing says nothing about how much of a guess was right."""
    if not given:
        return False
    # surrogateescape: aiohttp hands on a header's bytes that are not UTF-8 as surrogates; they never match
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def token_from_headers(headers) -> str | None:
    """`Authorization: Bearer TOKEN` or `X-Admin-Token: TOKEN`; None when neither is there."""
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("X-Admin-Token", "").strip() or None
