"""A real HTTP bucket on 127.0.0.1 that can answer 200, 404, 500, slowly, or with a cut-off body."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class HttpBucket:
    """Files by name; `behave[name]` changes how one is answered: "404", "500", "500 once", "slow",
    "truncated", "huge" (announces a length over any limit), "redirect URL" (302 to URL). `hits` counts requests
    per name."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    behave: dict[str, str] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    slow_s: float = 1.0
    delay_s: float = 0.0  # every answer waits this long (to see concurrency)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def template(self) -> str:
        return self.url + "/{post_id}.{ext}"


def _handler(bucket: HttpBucket) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            name = self.path.lstrip("/")
            with bucket.lock:
                bucket.hits[name] += 1
                bucket.in_flight += 1
                bucket.max_in_flight = max(bucket.max_in_flight, bucket.in_flight)
                first = bucket.hits[name] == 1
            try:
                self._answer(name, bucket.behave.get(name, ""), first)
            finally:
                with bucket.lock:
                    bucket.in_flight -= 1

        def _answer(self, name: str, how: str, first: bool) -> None:
            time.sleep(bucket.delay_s)
            if how.startswith("redirect "):
                self.send_response(302)
                self.send_header("Location", how.removeprefix("redirect "))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            body = bucket.files.get(name)
            if how == "slow":
                time.sleep(bucket.slow_s)
            if how == "404" or body is None:
                return self._send(404, b"not found")
            if how == "500" or (how == "500 once" and first):
                return self._send(500, b"oops")
            if how == "truncated":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return None
            if how == "huge":
                self.send_response(200)
                self.send_header("Content-Length", str(10**12))
                self.end_headers()
                self.close_connection = True
                return None
            return self._send(200, body)

        def _send(self, status: int, body: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting: fine
                pass

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops connections a concurrent client opens at once
    daemon_threads = True


@pytest.fixture
def http_bucket() -> Iterator[HttpBucket]:
    bucket = HttpBucket()
    server = _Server(("127.0.0.1", 0), _handler(bucket))
    bucket.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield bucket
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
