"""The web UI served for tests: a fake node behind the real HttpServer on 127.0.0.1, always stopped after."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sdswarm.web.app import create_app
from sdswarm.web.server import HttpServer
from tests.web.fake_node import FakeNode

TOKEN = "test-admin-token-0123456789abcdef"


@dataclass
class Answer:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Served:
    node: FakeNode
    base: str  # http://127.0.0.1:PORT
    token: str

    def call(self, method: str, path: str, *, body=None, raw: bytes | None = None, headers: dict | None = None,
             admin: bool = False) -> Answer:
        headers = dict(headers or {})
        if admin:
            headers["Authorization"] = f"Bearer {self.token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return Answer(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as error:
            return Answer(error.code, dict(error.headers), error.read())

    def get(self, path: str, **kwargs) -> Answer:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> Answer:
        return self.call("POST", path, **kwargs)


def serve(node: FakeNode, token: str = TOKEN, swarm_period: float = 0.2) -> tuple[HttpServer, str]:
    server = HttpServer([], "127.0.0.1", 0, app=create_app(node, admin_token=token, swarm_period=swarm_period))
    port = server.start()
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture
def served(tmp_path) -> Iterator[Served]:
    node = FakeNode(tmp_path / "node-out", tick=0.05, leak=TOKEN).begin()
    server, base = serve(node)
    try:
        yield Served(node, base, TOKEN)
    finally:
        server.stop()
        node.close()


@pytest.fixture
def node_url(tmp_path) -> Iterator[str]:
    """The URL of a real node's page, training the tiny model, with the admin token in its fragment
    (`http://HOST:PORT/#token=...`, as the node's console shows it). The only input of the browser test."""
    from tests.swarm.peers import Peer  # a real `sdswarm mother` process on 127.0.0.1, in its own group

    node = Peer("node", tmp_path, max_steps=100_000).start()
    try:
        node.wait_until(lambda: "web UI: http://" in node.log() and node.step() >= 2, "the node training",
                        timeout=300)
        yield f"http://{node.address}/#token={(node.out / 'admin_token').read_text().strip()}"
    finally:
        node.kill()
