"""The UI port's guards: downloads need the token (or a node's opt-in), zips carry no local path, bodies stay small,
bad input is a 400 with no traceback anywhere public, slow and many connections are cut, Host is checked."""

from __future__ import annotations

import io
import json
import logging
import socket
import time
import zipfile
from pathlib import Path

import pytest

from sdswarm.web.app import create_app
from sdswarm.web.log_tail import LogTail
from sdswarm.web.server import HttpServer
from tests.web.conftest import TOKEN, Served
from tests.web.fake_node import FakeNode
from tests.web.test_app import assert_private

DOWNLOADS = {"zip": "/api/ui/checkpoints/step_00000010/zip", "state": "/api/ui/checkpoints/step_00000010/zip?state=1",
             "single-file": "/api/ui/checkpoints/step_00000010/single-file"}


def raw(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send `request` as it is; everything the server answers until it closes (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        try:
            while piece := sock.recv(65536):
                received += piece
        except (TimeoutError, ConnectionResetError):
            pass
        return received


def port_of(served: Served) -> int:
    return int(served.base.rsplit(":", 1)[1])


@pytest.fixture
def public(tmp_path):
    """A node that lets anyone download its models (public_downloads: true)."""
    node = FakeNode(tmp_path / "public-out")
    node.write_checkpoint(10, single_file=True)
    server = HttpServer([], "127.0.0.1", 0, app=create_app(node, admin_token=TOKEN, public_downloads=True))
    try:
        yield Served(node, f"http://127.0.0.1:{server.start()}", TOKEN)
    finally:
        server.stop()


# --- downloads ---

@pytest.mark.parametrize("kind", list(DOWNLOADS))
def test_downloads_need_the_admin_token(served, kind):
    served.node.write_checkpoint(10, single_file=True)
    refused = served.get(DOWNLOADS[kind])
    assert refused.status == 401 and "needs the admin token" in refused.json()["error"]
    assert refused.body[:2] != b"PK" and refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert served.get(DOWNLOADS[kind], headers={"X-Admin-Token": "wrong-token"}).status == 403
    assert served.get(DOWNLOADS[kind], admin=True).status == 200
    listing = served.get("/api/ui/checkpoints").json()
    assert listing["public_downloads"] is False  # the page knows to ask for a ticket


def test_a_ticket_opens_one_download_for_a_minute(served):
    served.node.write_checkpoint(10, single_file=True)
    ticket_path = served.get("/api/ui/checkpoints").json()["checkpoints"][0]["ticket"]
    assert served.post(f"{ticket_path}?kind=zip").status == 401  # a ticket itself needs the token
    for kind, path in DOWNLOADS.items():
        answer = served.post(f"{ticket_path}?kind={kind}", admin=True).json()
        assert answer["url"].startswith(path.split("?")[0]) and answer["expires"] <= time.time() + 61
        download = served.get(answer["url"])  # no token: the page follows this link
        assert download.status == 200 and download.body[:2] in (b"PK", b"si"), kind
    zip_ticket = served.post(f"{ticket_path}?kind=zip", admin=True).json()["url"].split("ticket=")[1]
    for forged in (f"{DOWNLOADS['state']}&ticket={zip_ticket}",  # a model zip's ticket does not open the state
                   f"{DOWNLOADS['zip']}?ticket={zip_ticket[:-1]}{'1' if zip_ticket.endswith('0') else '0'}",
                   f"{DOWNLOADS['zip']}?ticket={int(time.time()) - 5}-{zip_ticket.split('-')[1]}",  # expired
                   f"{DOWNLOADS['zip']}?ticket=99999999999-abc", f"{DOWNLOADS['zip']}?ticket=%ff%fe"):
        answer = served.get(forged)
        assert answer.status == 403 and "expired or is not for this file" in answer.json()["error"], forged
    assert served.post(f"{ticket_path}?kind=everything", admin=True).status == 400
    assert served.post("/api/ui/checkpoints/step_00000099/ticket?kind=zip", admin=True).status == 404


def test_public_downloads_are_opt_in_models_only_and_rate_limited(public):
    assert public.get("/api/ui/checkpoints").json()["public_downloads"] is True
    assert public.get(DOWNLOADS["state"]).status == 401  # the training state is never public
    first = public.get(DOWNLOADS["zip"])
    assert first.status == 200 and first.body[:2] == b"PK"
    again = public.get(DOWNLOADS["single-file"])  # the same address, within the interval
    assert again.status == 429 and "one public download per 10 minutes" in again.json()["error"]
    assert int(again.headers["Retry-After"]) > 500
    assert public.get(DOWNLOADS["single-file"], admin=True).status == 200  # the admin is never limited


def test_a_public_download_leaves_the_admin_a_slot(public):
    folder = public.node.write_checkpoint(20)
    (folder / "aaa").mkdir()
    (folder / "aaa" / "big.bin").write_bytes(b"\0" * (64 << 20))
    with socket.create_connection(("127.0.0.1", port_of(public)), timeout=10) as sock:
        sock.sendall(b"GET /api/ui/checkpoints/step_00000020/zip HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # a stalled public reader holds the public slot
        assert public.get(DOWNLOADS["zip"]).status in (429, 503)
        assert public.get(DOWNLOADS["zip"], admin=True).status == 200


# --- what a zip carries ---

def test_zips_carry_no_local_path_in_the_parts_configs(served):
    served.node.write_checkpoint(10)
    archive = zipfile.ZipFile(io.BytesIO(served.get(DOWNLOADS["state"], admin=True).body))
    assert archive.testzip() is None
    for name in archive.namelist():
        if name.endswith(".json"):
            assert_private(archive.read(name), served.node)
    unet = json.loads(archive.read("step_00000010/unet/config.json"))
    assert unet == {"_class_name": "UNet2DConditionModel", "sample_size": 64}  # the rest as it was
    text = json.loads(archive.read("step_00000010/text_encoder/config.json"))
    assert "_name_or_path" not in text and text["hidden_size"] == 768 and text["note"].endswith("/elsewhere")
    weights = "step_00000010/unet/diffusion_pytorch_model.safetensors"
    assert archive.read(weights) == (served.node.output_dir / "checkpoints" / weights).read_bytes()


# --- bodies and bad input ---

def chunked_post(path: str, body: bytes, piece: int = 4096) -> bytes:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece]) for i in range(0, len(body), piece))
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() \
        + chunks + b"0\r\n\r\n"


def test_the_body_limit_holds_for_chunked_bodies(served):
    big = b'{"public_address": "' + b"a" * 200_000 + b'"}'
    answer = raw(port_of(served), chunked_post("/api/ui/settings", big))
    assert answer.startswith(b"HTTP/1.1 413") and b"Traceback" not in answer
    assert served.node.settings().public_address is None
    small = raw(port_of(served), chunked_post("/api/ui/settings", b'{"public_address": "node.example.org"}'))
    assert small.startswith(b"HTTP/1.1 200")  # chunked is fine within the limit


def test_deeply_nested_json_is_a_400_and_no_traceback_reaches_the_log(served):
    for body in (b"[" * 50_000, b'{"mode": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", b"\xff\xfe{}"):
        answer = served.post("/api/ui/settings", raw=body, admin=True, headers={"Content-Type": "application/json"})
        assert answer.status == 400 and "JSON object" in answer.json()["error"]
    tail = "\n".join(served.get("/api/ui/log?lines=2000").json()["lines"])
    assert "Traceback" not in tail and "RecursionError" not in tail


BAD_REQUESTS = [
    ("GET", "/api/ui/history?since=%ff%fe&limit=%00"), ("GET", "/api/ui/history?since=1e999999"),
    ("GET", "/api/ui/log?lines=" + "9" * 5000), ("GET", "/api/ui/samples?limit=%F0%9F%92%A9"),
    ("GET", "/api/ui/checkpoints/%ff/zip?state=%ff"),
    ("GET", "/api/ui/checkpoints/step_00000010/zip?ticket=" + "-" * 999),
    ("POST", "/api/ui/control/%ff"), ("POST", "/api/ui/checkpoints/%ff/ticket?kind=%ff"),
    ("GET", "/api/v1/index/" + "z" * 300), ("GET", "/api/ui/" + "a/" * 500),
]


@pytest.mark.parametrize(("method", "path"), BAD_REQUESTS)
@pytest.mark.parametrize("token", [TOKEN, "bad\udcff-token"])
def test_bad_input_is_never_a_500(served, method, path, token):
    served.node.write_checkpoint(10)
    header = f"X-Admin-Token: {token}".encode("utf-8", "surrogateescape")  # bytes that are not UTF-8, too
    answer = raw(port_of(served), f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + header
                 + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    status = int(answer.split(b" ", 2)[1])
    assert 200 <= status < 500 and b"Traceback" not in answer, answer[:300]


def test_the_public_log_tail_never_holds_a_traceback(tmp_path):
    tail = LogTail()
    logger = logging.getLogger("sdswarm.test-guards")
    logger.setLevel(logging.INFO)
    with tail.attached():
        try:
            raise ValueError(f"broken in {tmp_path}")
        except ValueError:
            logger.exception("web UI: GET /api/ui/x failed")
        logger.warning("hivemind said:\nTraceback (most recent call last):\n  File \"/home/x/y.py\", line 1")
        logger.info("a plain line")
    lines = list(tail.lines)
    assert lines[0].endswith("web UI: GET /api/ui/x failed (traceback in node.log)")
    assert lines[1].endswith("hivemind said: (traceback in node.log)") and lines[2].endswith("a plain line")
    assert not any("Traceback" in line or str(tmp_path) in line for line in lines)


# --- connections ---

@pytest.fixture
def guarded(tmp_path, request):
    """The UI with a short header timeout (1 s, or as the test's `guards` mark says) and a cap of 3 connections."""
    mark = request.node.get_closest_marker("guards")
    node = FakeNode(tmp_path / "out")
    server = HttpServer([], "127.0.0.1", 0, app=create_app(node, admin_token=TOKEN), max_connections=3,
                        header_timeout=mark.kwargs["header_timeout"] if mark else 1.0)
    port = server.start()
    try:
        yield port
    finally:
        server.stop()


def test_a_client_that_never_finishes_its_headers_is_cut_off(guarded):
    start = time.monotonic()
    answer = raw(guarded, b"GET /api/ui/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", timeout=15)
    assert answer == b"" and time.monotonic() - start < 10  # closed, without waiting for the client
    assert raw(guarded, b"GET /api/ui/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200")


@pytest.mark.guards(header_timeout=60.0)  # the idle connections must outlive the test's own steps
def test_connections_beyond_the_cap_are_turned_away(guarded):
    idle = [socket.create_connection(("127.0.0.1", guarded), timeout=10) for _ in range(3)]
    try:
        time.sleep(0.3)
        answer = raw(guarded, b"GET /api/ui/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while not (answer := raw(guarded, b"GET /api/ui/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
               ).startswith(b"HTTP/1.1 200"):
        assert time.monotonic() < deadline, answer[:100]
        time.sleep(0.1)


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1", True), ("127.0.0.1:8765", True), ("localhost:8765", True), ("LOCALHOST.", True),
    ("[::1]:8765", True), ("app.localhost", True), ("0.0.0.0:8765", True),
    ("evil.example", False), ("evil.example:8765", False),
    ("127.0.0.1.evil.example", False), ("", False),
])
def test_a_loopback_connection_must_name_a_loopback_host(served, host, allowed):
    answer = raw(port_of(served), f"GET /api/ui/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    status = int(answer.split(b" ", 2)[1])
    assert (status == 200) is allowed, answer[:200]
    if not allowed:
        assert status == 400 and b"only to requests for localhost or 127.0.0.1" in answer


def test_normal_use_still_works(served):
    """The page, the dashboard's reads, a settings change and an admin download, as the page makes them."""
    served.node.write_checkpoint(10)
    assert served.get("/").status == 200 and served.get("/api/ui/status").status == 200
    assert served.post("/api/ui/settings", body={"public_address": "пример.рф"}, admin=True).json()["settings"][
        "public_address"] == "xn--e1afmkfd.xn--p1ai"  # a name in another script, in the form DNS carries
    ticket = served.get("/api/ui/checkpoints").json()["checkpoints"][0]["ticket"]
    url = served.post(f"{ticket}?kind=zip", admin=True).json()["url"]
    assert zipfile.ZipFile(io.BytesIO(served.get(url).body)).testzip() is None
    assert Path(served.node.output_dir / "node.yaml").exists()
