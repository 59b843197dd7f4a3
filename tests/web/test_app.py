"""The UI's HTTP API against a fake node, over a real HttpServer on 127.0.0.1."""

from __future__ import annotations

import io
import shutil
import socket
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from sdswarm.web import files
from sdswarm.web.auth import TOKEN_FILE
from tests.web.conftest import TOKEN, serve
from tests.web.fake_node import FakeNode

PUBLIC_GETS = ["/api/ui/status", "/api/ui/history", "/api/ui/log", "/api/ui/settings", "/api/ui/checkpoints",
               "/api/ui/samples"]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def raw_get(path: str, *headers: str) -> bytes:
    """A GET as a raw socket sends it: a loopback Host and the admin token."""
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {TOKEN}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def assert_private(body: bytes, node: FakeNode) -> None:
    """Nothing that names this machine's folders or holds the token."""
    text = body.decode("utf-8", errors="replace")
    for secret in (TOKEN, str(node.output_dir), str(node.output_dir.resolve()), str(Path.home()),
                   str(node.output_dir.parent)):
        assert secret not in text, f"{secret!r} leaked in {text[:300]}"


# --- the page ---

def test_page_and_its_files_are_served_with_safe_headers(served):
    page = served.get("/")
    assert page.status == 200 and b"/static/app.js" in page.body
    assert b"https://" not in page.body and b"http://" not in page.body  # no CDN: works offline
    for path in ("/static/app.js", "/static/style.css", "/static/vendor/uplot/uPlot.iife.min.js",
                 "/static/vendor/uplot/uPlot.min.css", "/static/vendor/uplot/LICENSE"):
        assert served.get(path).status == 200, path
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Server"] == "sdswarm"  # not the Python and aiohttp versions


# --- the public snapshot ---

def test_status_is_public_redacted_and_valid_json(served):
    # answers are shared for a second (SNAPSHOT_TTL): wait through the API, not on the node
    wait_for(lambda: served.get("/api/ui/status").json()["progress"]["step"] > 0)
    answer = served.get("/api/ui/status")
    assert answer.status == 200 and answer.headers["Cache-Control"] == "no-store"
    status = answer.json()  # strict JSON: NaN would not parse in a browser
    assert status["state"] == "training" and status["progress"]["step"] > 0
    assert status["join_command"] == "sdswarm join 127.0.0.1:8765"
    assert status["data"]["workdir"] == "<output>/workdir"  # the node's folder, named without its path
    assert status["data"]["note"] == "<redacted>"  # the token, repeated by a careless node
    assert_private(answer.body, served.node)


def test_status_turns_nan_into_null(tmp_path):
    node = FakeNode(tmp_path / "out")  # never started: no step yet, loss NaN
    server, base = serve(node)
    try:
        from tests.web.conftest import Served

        status = Served(node, base, TOKEN).get("/api/ui/status").json()
        assert status["progress"]["loss"] is None and status["progress"]["loss_avg"] is None
    finally:
        server.stop()


def test_history_grows_and_answers_only_what_is_new(served):
    wait_for(lambda: len(served.get("/api/ui/history").json()["local"]) >= 5)
    first = served.get("/api/ui/history").json()
    assert len(first["local"]) >= 5 and first["downsampled"] is False
    assert {"time", "step", "loss", "loss_avg", "samples_per_second"} <= set(first["local"][0])
    since = first["local"][-1]["time"]
    wait_for(lambda: served.get(f"/api/ui/history?since={since}").json()["local"])
    newer = served.get(f"/api/ui/history?since={since}").json()["local"]
    assert newer and all(r["time"] > since for r in newer)
    # the swarm's loss: the mean of the peers' published losses, sampled by the UI
    wait_for(lambda: served.get("/api/ui/history").json()["swarm"])
    point = served.get("/api/ui/history").json()["swarm"][-1]
    assert point["peers"] == 3 and point["loss"] is not None


def test_history_is_thinned_to_the_limit(served):
    wait_for(lambda: len(served.get("/api/ui/history").json()["local"]) >= 40)
    answer = served.get("/api/ui/history?limit=10").json()
    assert answer["downsampled"] is True and len(answer["local"]) == 10
    steps = [r["step"] for r in answer["local"] if "step" in r]  # rounds are records too
    assert steps[0] == 1 and steps == sorted(set(steps))  # spread over the whole run, the newest included


@pytest.mark.parametrize("query", ["since=abc", "since=-1", "since=nan", "limit=0", "limit=x", "limit=10000000"])
def test_history_refuses_bad_parameters(served, query):
    answer = served.get(f"/api/ui/history?{query}")
    assert answer.status == 400 and answer.json()["error"].startswith(f"'{query.split('=')[0]}'")


def test_log_tail_is_redacted_and_bounded(served):
    wait_for(lambda: served.node.step > 10)
    lines = served.get("/api/ui/log?lines=3").json()["lines"]
    assert len(lines) == 3
    assert "saved checkpoint <output>/checkpoints/step_00000001" in lines
    assert "token is <redacted>" in lines
    assert served.get("/api/ui/log?lines=100000").status == 400
    assert_private(served.get("/api/ui/log?lines=2000").body, served.node)


def test_settings_are_public_to_read(served):
    view = served.get("/api/ui/settings").json()
    assert view["settings"]["mode"] == "relay" and view["applied"] == "on restart"
    assert view["fields"]["public_address"]["description"]
    assert view["after_restart"]["join_command"] == "sdswarm join 127.0.0.1:8765"


# --- admin: refused without the token ---

ADMIN_CALLS = [("/api/ui/settings", {"public_address": "evil.example.org"}), ("/api/ui/control/start", {}),
               ("/api/ui/control/stop", {}), ("/api/ui/control/checkpoint", {}), ("/api/ui/invite", {"hours": 1}),
               ("/api/ui/ban", {"peer_ids": ["QmPeer"]})]


@pytest.mark.parametrize(("path", "body"), ADMIN_CALLS)
def test_admin_calls_without_a_token_are_refused(served, path, body):
    answer = served.post(path, body=body)
    assert answer.status == 401 and "admin token required" in answer.json()["error"]
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert served.node.calls == []


@pytest.mark.parametrize(("path", "body"), ADMIN_CALLS)
@pytest.mark.parametrize("headers", [{"Authorization": "Bearer wrong-token"}, {"X-Admin-Token": "wrong-token"},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"},
                                     {"Authorization": f"Bearer {TOKEN[:-1]}"}])
def test_admin_calls_with_a_wrong_token_are_refused(served, path, body, headers):
    answer = served.post(path, body=body, headers=headers)
    assert answer.status in (401, 403) and answer.json()["error"]
    assert served.node.calls == []
    assert served.get("/api/ui/settings").json()["settings"]["public_address"] is None
    assert_private(answer.body, served.node)


def test_admin_check(served):
    assert served.get("/api/ui/admin").status == 401
    assert served.get("/api/ui/admin", headers={"X-Admin-Token": "nope"}).status == 403
    assert served.get("/api/ui/admin", headers={"X-Admin-Token": TOKEN}).json() == {"admin": True}
    assert served.get("/api/ui/admin", admin=True).status == 200


def test_invites_and_bans_need_the_admin_token_and_check_their_input(served):
    answer = served.post("/api/ui/invite", body={"hours": 2}, admin=True)
    assert answer.json()["command"] == "python server.py -j 127.0.0.1:8765 --invite fake-2h"
    for bad in ({"hours": 0}, {"hours": True}, {"hours": "soon"}):
        assert served.post("/api/ui/invite", body=bad, admin=True).status == 400
    assert served.post("/api/ui/ban", body={"peer_ids": ["QmPeer"]}, admin=True).json() == {"banned": ["QmPeer"]}
    assert served.post("/api/ui/ban", body={"peer_ids": ["QmPeer"], "lift": True}, admin=True).json() == {"banned": []}
    for bad in ({}, {"peer_ids": []}, {"peer_ids": "QmPeer"}, {"peer_ids": [1]}):
        assert served.post("/api/ui/ban", body=bad, admin=True).status == 400
    refused = served.post("/api/ui/ban", body={"peer_ids": ["nonsense"]}, admin=True)
    assert refused.status == 400 and "not a peer id" in refused.json()["error"]


# --- settings ---

def test_settings_change_is_validated_saved_and_shown(served):
    answer = served.post("/api/ui/settings", body={"public_address": "node.example.org", "dht_port_external": 40123},
                         headers={"X-Admin-Token": TOKEN})
    assert answer.status == 200, answer.body
    view = answer.json()
    assert view["saved"] is True and view["settings"]["public_address"] == "node.example.org"
    assert view["after_restart"]["dht_announce"] == ["/dns/node.example.org/tcp/40123"]
    assert served.get("/api/ui/settings").json()["settings"]["dht_port_external"] == 40123
    saved = yaml.safe_load((served.node.output_dir / "node.yaml").read_text())
    assert saved["public_address"] == "node.example.org"
    assert TOKEN not in (served.node.output_dir / "node.yaml").read_text()


@pytest.mark.parametrize(("change", "key"), [
    ({"ie_port_internal": 70000}, "ie_port_internal"),
    ({"dht_port_external": -1}, "dht_port_external"),
    ({"mode": "server"}, "mode"),
    ({"public_address": "not an address!"}, "public_address"),
    ({"listen_host": "everywhere"}, "listen_host"),
    ({"ie_port_internal": "eighty"}, "ie_port_internal"),
    ({"admin_token": "x"}, "admin_token"),
    ({"ie_port_internal": True}, "ie_port_internal"),  # pydantic would read true as port 1
    ({"dht_port_external": "8080"}, "dht_port_external"),
    ({"ie_port_external": 80.5}, "ie_port_external"),
    ({"public_address": "my_host.example.org"}, "public_address"),
    ({"public_address": "node.example.123"}, "public_address"),
    ({"public_address": "bad..example.org"}, "public_address"),
    ({"public_downloads": "yes"}, "public_downloads"),
])
def test_invalid_settings_are_refused_naming_the_key(served, change, key):
    answer = served.post("/api/ui/settings", body=change, admin=True)
    assert answer.status == 400
    error = answer.json()
    assert key in error["error"] and key in error["keys"]
    assert served.get("/api/ui/settings").json()["settings"] == served.node.settings().model_dump(mode="json")
    assert not (served.node.output_dir / "node.yaml").exists()


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"{}", b'"relay"', b"null"])
def test_settings_body_must_be_a_json_object(served, raw):
    answer = served.post("/api/ui/settings", raw=raw, admin=True, headers={"Content-Type": "application/json"})
    assert answer.status == 400 and "JSON object" in answer.json()["error"]


def test_oversized_settings_body_is_refused(served):
    answer = served.post("/api/ui/settings", raw=b'{"mode": "' + b"x" * 100_000 + b'"}', admin=True)
    assert answer.status == 413


# --- controls ---

@pytest.mark.parametrize(("action", "call"), [("start", "start"), ("stop", "stop"), ("checkpoint", "save_checkpoint")])
def test_controls_call_the_node(served, action, call):
    answer = served.post(f"/api/ui/control/{action}", admin=True)
    assert answer.status == 200 and answer.json() == {"action": action, "done": True, "accepted": True}
    assert served.node.calls == [call]


def test_save_checkpoint_makes_one_appear(served):
    assert served.get("/api/ui/checkpoints").json()["checkpoints"] == []
    served.post("/api/ui/control/checkpoint", admin=True)
    wait_for(lambda: served.get("/api/ui/checkpoints").json()["checkpoints"])


def test_stop_then_start(served):
    served.post("/api/ui/control/stop", admin=True)
    assert served.get("/api/ui/status").json()["state"] == "stopped"
    assert served.get("/api/ui/checkpoints").json()["checkpoints"]  # a stop checkpoints first
    served.post("/api/ui/control/start", admin=True)
    assert served.get("/api/ui/status").json()["state"] == "training"


def test_control_errors(served):
    assert served.post("/api/ui/control/reboot", admin=True).status == 404
    assert served.get("/api/ui/control/start").status == 405  # a control is never a GET (no link can trigger it)
    served.node.control_error = RuntimeError(f"already training in {served.node.output_dir}")
    answer = served.post("/api/ui/control/start", admin=True)
    assert answer.status == 409 and "already training in <output>" in answer.json()["error"]


def test_a_slow_control_is_accepted_without_waiting(served):
    served.node.control_delay = 4.0  # a stop writing a big checkpoint
    start = time.monotonic()
    answer = served.post("/api/ui/control/stop", admin=True)
    assert answer.status == 202 and answer.json()["accepted"] is True
    assert time.monotonic() - start < 3.5
    wait_for(lambda: served.get("/api/ui/status").json()["state"] == "stopped", timeout=10)


# --- files ---

def test_checkpoint_listing_offers_complete_checkpoints_only(served):
    out = served.node.output_dir
    served.node.write_checkpoint(10)
    served.node.write_checkpoint(20, single_file=True)
    (out / "checkpoints" / ".step_00000030.123-0123abcd.tmp").mkdir()  # being written
    (out / "checkpoints" / "step_00000040").mkdir()  # no training state: incomplete
    (out / "checkpoints" / "notes.txt").write_text("x")
    answer = served.get("/api/ui/checkpoints")
    listing = answer.json()["checkpoints"]
    assert [c["name"] for c in listing] == ["step_00000020", "step_00000010"]
    assert listing[0]["single_file"] == "/api/ui/checkpoints/step_00000020/single-file"
    assert listing[1]["single_file"] is None and listing[1]["model_bytes"] > 0
    assert_private(answer.body, served.node)


def test_checkpoint_listing_is_rebuilt_only_when_the_folder_changes(served, monkeypatch):
    sized = []
    real_size = files.folder_size
    monkeypatch.setattr(files, "folder_size", lambda c, **kw: sized.append(c.name) or real_size(c, **kw))
    served.node.write_checkpoint(10)
    for _ in range(3):
        assert [c["name"] for c in served.get("/api/ui/checkpoints").json()["checkpoints"]] == ["step_00000010"]
    assert sized == ["step_00000010"]  # three polls, one walk over the checkpoint's files
    served.node.write_checkpoint(20)
    assert [c["name"] for c in served.get("/api/ui/checkpoints").json()["checkpoints"]] == ["step_00000020",
                                                                                          "step_00000010"]
    (served.node.output_dir / "checkpoints" / "step_00000010" / "step_00000010.safetensors").write_bytes(b"x")
    listing = served.get("/api/ui/checkpoints").json()["checkpoints"]
    assert listing[1]["single_file"] == "/api/ui/checkpoints/step_00000010/single-file"  # an export shows up


def test_checkpoint_zip_is_a_loadable_folder_without_the_local_config(served):
    served.node.write_checkpoint(10)
    answer = served.get("/api/ui/checkpoints/step_00000010/zip", admin=True)
    assert answer.status == 200 and answer.headers["Content-Type"] == "application/zip"
    assert 'filename="step_00000010-model.zip"' in answer.headers["Content-Disposition"]
    archive = zipfile.ZipFile(io.BytesIO(answer.body))
    assert archive.testzip() is None
    names = set(archive.namelist())
    assert "step_00000010/model_index.json" in names
    assert "step_00000010/unet/diffusion_pytorch_model.safetensors" in names
    assert "step_00000010/config.yaml" not in names  # it names this machine's folders
    assert "step_00000010/training_state.pt" not in names
    assert archive.read("step_00000010/unet/diffusion_pytorch_model.safetensors") == \
        (served.node.output_dir / "checkpoints/step_00000010/unet/diffusion_pytorch_model.safetensors").read_bytes()
    full = zipfile.ZipFile(io.BytesIO(served.get("/api/ui/checkpoints/step_00000010/zip?state=1", admin=True).body))
    assert "step_00000010/training_state.pt" in full.namelist()
    assert "step_00000010/config.yaml" not in full.namelist()


def test_single_file_export_download(served):
    served.node.write_checkpoint(20, single_file=True)
    served.node.write_checkpoint(30)
    answer = served.get("/api/ui/checkpoints/step_00000020/single-file", admin=True)
    assert answer.status == 200 and answer.body == b"single-file-export" * 100
    assert 'filename="step_00000020.safetensors"' in answer.headers["Content-Disposition"]
    assert served.get("/api/ui/checkpoints/step_00000030/single-file", admin=True).status == 404


def test_a_big_download_can_be_abandoned(served):
    """A client that goes away mid-zip frees its download slot; the server goes on answering."""
    folder = served.node.write_checkpoint(50)
    (folder / "unet" / "big.safetensors").write_bytes(b"\0" * (64 << 20))
    for _ in range(3):  # more than the concurrent-download limit: each slot must come back
        with socket.create_connection(("127.0.0.1", int(served.base.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(raw_get("/api/ui/checkpoints/step_00000050/zip"))
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)
    wait_for(lambda: served.get("/api/ui/checkpoints/step_00000050/zip", admin=True).status == 200, timeout=30)


def test_samples_latest_first(served):
    for step in (25, 50, 75):
        served.node.write_sample(step)
    samples = served.get("/api/ui/samples?limit=2").json()["samples"]
    assert [s["name"] for s in samples] == ["step_00000075.png", "step_00000050.png"]
    image = served.get(samples[0]["url"])
    assert image.status == 200 and image.headers["Content-Type"] == "image/png"
    assert image.body.startswith(b"\x89PNG")


TRAVERSALS = [
    "..", "../..", "..%2F..%2Fnode.yaml", "%2e%2e%2f%2e%2e%2fnode.yaml", "step_00000010%2F..%2F..%2Fnode.yaml",
    "%2Fetc%2Fpasswd", "..%5C..%5Cnode.yaml", ".tmp-step_00000030-1", "step_00000010%00", "step_0000001",
    "step_00000099", "outside", "STEP_00000010",
]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_file_routes_refuse_anything_not_listed(served, name):
    served.node.write_checkpoint(10)
    served.node.write_sample(10)
    (served.node.output_dir / "checkpoints" / ".tmp-step_00000030-1").mkdir()
    for path in (f"/api/ui/checkpoints/{name}/zip", f"/api/ui/checkpoints/{name}/single-file",
                 f"/api/ui/samples/{name}", f"/api/ui/samples/{name}.png"):
        answer = served.get(path)
        assert answer.status in (400, 404), (path, answer.status)
        assert b"PNG" not in answer.body[:8] and b"PK" not in answer.body[:2]
        assert_private(answer.body, served.node)


def test_symlinks_out_of_the_output_folder_are_not_served(served, tmp_path):
    secret = tmp_path / "elsewhere"
    (secret / "unet").mkdir(parents=True)
    (secret / "training_state.pt").write_bytes(b"x")
    (secret / "unet" / "private.safetensors").write_bytes(b"private")
    (served.node.output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (served.node.output_dir / "checkpoints" / "step_00000077").symlink_to(secret, target_is_directory=True)
    (served.node.output_dir / "samples").mkdir(exist_ok=True)
    (served.node.output_dir / "samples" / "step_00000077.png").symlink_to(secret / "unet" / "private.safetensors")
    inside = served.node.write_checkpoint(10)
    (inside / "unet" / "link.safetensors").symlink_to(secret / "unet" / "private.safetensors")
    assert served.get("/api/ui/checkpoints/step_00000077/zip", admin=True).status == 404
    assert served.get("/api/ui/samples/step_00000077.png").status == 404
    archive = zipfile.ZipFile(io.BytesIO(served.get("/api/ui/checkpoints/step_00000010/zip", admin=True).body))
    assert "step_00000010/unet/link.safetensors" not in archive.namelist()


@pytest.mark.parametrize("path", ["/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2Fapp.py",
                                  "/static/%2e%2e/%2e%2e/config.py", "/static/", "/static/vendor/"])
def test_static_route_stays_in_its_folder(served, path):
    answer = served.get(path)
    assert answer.status in (403, 404), path
    assert b"import" not in answer.body


# --- nothing private anywhere ---

def test_no_answer_holds_a_path_or_the_token(served):
    served.node.write_checkpoint(10, single_file=True)
    served.node.write_sample(10)
    wait_for(lambda: served.node.step > 3)
    for path in [*PUBLIC_GETS, "/api/ui/log?lines=2000", "/api/ui/nope", "/api/ui/history?since=x"]:
        assert_private(served.get(path).body, served.node)
    for path, body in ADMIN_CALLS:
        assert_private(served.post(path, body=body).body, served.node)
        assert_private(served.post(path, body=body, headers={"X-Admin-Token": "wrong"}).body, served.node)
    assert_private(served.post("/api/ui/settings", body={"ie_port_internal": 70000}, admin=True).body, served.node)
    assert not list(served.node.output_dir.glob(TOKEN_FILE))  # the UI never writes the token anywhere itself


def test_server_stops_promptly_during_a_download(tmp_path):
    node = FakeNode(tmp_path / "out")
    folder = node.write_checkpoint(5)
    (folder / "unet" / "big.safetensors").write_bytes(b"\0" * (64 << 20))
    server, base = serve(node)
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(raw_get("/api/ui/checkpoints/step_00000005/zip"))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the client stalls: the zip waits for it
        start = time.monotonic()
        server.stop()
        assert time.monotonic() - start < 8


def test_a_checkpoint_pruned_mid_download_cuts_the_zip_off(served):
    folder = served.node.write_checkpoint(60)
    (folder / "aaa").mkdir()  # more than socket buffers hold: the zip cannot be done before the client reads on
    (folder / "aaa" / "big.bin").write_bytes(b"\0" * (32 << 20))
    with socket.create_connection(("127.0.0.1", int(served.base.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(raw_get("/api/ui/checkpoints/step_00000060/zip", "Connection: close"))
        received = sock.recv(65536)
        shutil.rmtree(folder)  # pruned while the client is still reading
        while piece := sock.recv(1 << 20):
            received += piece
    assert received.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 500" not in received  # no error page spliced into the zip
    assert not received.endswith(b"0\r\n\r\n")  # the chunked body never completes: the client sees a failure
    assert served.get("/api/ui/status").status == 200


def test_at_most_two_zips_are_built_at_once(served):
    folder = served.node.write_checkpoint(70)
    (folder / "aaa").mkdir()
    (folder / "aaa" / "big.bin").write_bytes(b"\0" * (64 << 20))
    port = int(served.base.rsplit(":", 1)[1])
    stalled = []
    try:
        for _ in range(2):  # clients that stop reading: their zips wait, holding their slots
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(raw_get("/api/ui/checkpoints/step_00000070/zip"))
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            stalled.append(sock)
        busy = served.get("/api/ui/checkpoints/step_00000070/zip", admin=True)
        assert busy.status == 503 and busy.headers["Retry-After"] == "60" and "downloads" in busy.json()["error"]
    finally:
        for sock in stalled:
            sock.close()
    wait_for(lambda: served.get("/api/ui/checkpoints/step_00000070/zip", admin=True).status == 200, timeout=30)


def test_many_viewers_cost_the_node_one_status_a_second(served):
    calls = []
    status = served.node.status
    served.node.status = lambda: calls.append(1) or status()
    start = time.monotonic()
    for _ in range(30):
        served.get("/api/ui/status")
    assert len(calls) <= (time.monotonic() - start) / 1.0 + 2  # +1 for the swarm sampler's own read
