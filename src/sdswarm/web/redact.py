"""Keep local paths and secrets out of everything the web UI answers.

The node's snapshot, its log lines and its error messages are written for the person at the console and
may name folders on this machine (`saved checkpoint /home/ann/sd/output/checkpoints/step_00001000`).
The UI is readable by anyone who can reach the port, so every string it sends passes through `Redactor`:
the node's output folder becomes `<output>`, the home folder `~`, any other absolute path its last part,
and secrets (the admin token) `<redacted>`. Numbers that JSON cannot carry (NaN, inf) become null.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# an absolute path starting a token (after a space, quote, '=', '(' or at the start); the first component is
# checked against this machine's root folder, so URL paths (/api/...) and multiaddrs (/ip4/...) stay as they are
_ABSOLUTE = re.compile(r"(?<![\w.:/~<>-])/([^\s/'\"()<>\[\],;]+)((?:/[^\s/'\"()<>\[\],;]*)*)")


class Redactor:
    def __init__(self, output_dir: Path, *, secrets: Iterable[str] = (), private_paths: Iterable[Path] = ()) -> None:
        self.secrets = [s for s in secrets if s]
        prefixes: list[tuple[str, str]] = []
        for path in [Path(output_dir), *private_paths]:
            label = "<output>" if path == Path(output_dir) else "<private>"
            for form in {str(path.absolute()), str(path.resolve())}:
                prefixes.append((form.rstrip("/"), label))
        home = str(Path.home())
        if home not in ("/", ""):
            prefixes.append((home.rstrip("/"), "~"))
        # the longest first: the output folder usually lives under home and should keep its own label
        self._prefixes = sorted(set(prefixes), key=lambda p: -len(p[0]))
        self._roots = _root_entries()

    def text(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, "<redacted>")
        for prefix, label in self._prefixes:
            if prefix and prefix in value:
                value = re.sub(re.escape(prefix) + r"(?![\w.-])", label, value)
        return _ABSOLUTE.sub(self._other_path, value)

    def _other_path(self, match: re.Match) -> str:
        first, rest = match.group(1), match.group(2)
        if first not in self._roots:
            return match.group(0)  # not a folder on this machine: a URL path, a multiaddr, a fraction
        last = [part for part in rest.split("/") if part]
        return "…/" + last[-1] if last else "…"

    def __call__(self, value: Any) -> Any:
        """A JSON-able copy of `value` with every string redacted (keys included) and NaN/inf as None."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bool) or value is None or isinstance(value, int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {self.text(str(k)): self(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self(v) for v in value]
        if isinstance(value, os.PathLike):
            return self.text(os.fspath(value))
        if hasattr(value, "model_dump"):  # a pydantic model
            return self(value.model_dump(mode="json"))
        return self.text(str(value))


def _root_entries() -> set[str]:
    """Names under / (home, tmp, work, ...): an absolute path in a message starts with one of them."""
    names = {"home", "root", "tmp", "var", "mnt", "media", "opt", "srv", "data", "Users", "private"}
    with contextlib.suppress(OSError):
        names |= {entry.name for entry in os.scandir("/") if entry.is_dir(follow_symlinks=True)}
    parts = Path(tempfile.gettempdir()).parts
    if len(parts) > 1:
        names.add(parts[1])
    return names
