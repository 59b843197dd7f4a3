"""The page in a real browser: Debian's chromium, headless, driven by Playwright (no downloaded browser).

The only input is the `node_url` fixture (the page's URL with the admin token in its fragment), so the same
test runs against the fake node here or a real node training the tiny model.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image, ImageStat

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium)"),
]


def status_of(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/api/ui/status", timeout=30) as answer:
        return json.load(answer)


def not_blank(png: bytes) -> None:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    stat = ImageStat.Stat(image)
    colours = len(image.getcolors(maxcolors=1 << 20) or [])
    assert max(stat.stddev) > 20 and colours > 50, f"screenshot looks blank: stddev {stat.stddev}, {colours} colours"


def test_the_page_in_chromium(node_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright  # a dev dependency: missing it is a failure

    parts = urlsplit(node_url)
    base = f"{parts.scheme}://{parts.netloc}"
    token = parts.fragment.removeprefix("token=")
    assert token, "node_url carries the admin token in its fragment: http://HOST:PORT/#token=..."

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
            outside, errors = [], []
            # the page must work offline: anything not from the node is refused, and counted
            context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                          else (outside.append(route.request.url), route.abort()))
            page = context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            # the wrong token (403) and the wrong port (400) below are refused on purpose: the browser logs those
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and not m.text.startswith(
                "Failed to load resource: the server responded with a status of 4") else None)

            # --- the dashboard, live: the loss chart has points, and more come without a reload ---
            page.goto(base + "/")
            expect(page.locator("#state")).not_to_have_text("connecting…", timeout=WAIT_MS)
            chart = page.locator("#chart-loss")
            expect(chart.locator("canvas")).to_have_count(1)
            page.wait_for_function("() => Number(document.querySelector('#chart-loss').dataset.points) > 1",
                                   timeout=WAIT_MS)
            first = int(chart.get_attribute("data-points"))
            page.wait_for_function(f"() => Number(document.querySelector('#chart-loss').dataset.points) > {first}",
                                   timeout=WAIT_MS)
            expect(page.locator("#peers tbody tr").first).not_to_have_class("empty", timeout=WAIT_MS)
            # the averaging rounds: dots on their chart, failed ones counted, the peers' rounds in the table
            page.wait_for_function("() => Number(document.querySelector('#chart-rounds').dataset.points) > 0",
                                   timeout=WAIT_MS)
            # a lone node: no spread to show yet, and its rounds are counted as alone
            expect(page.locator("#health-text")).to_contain_text("one model: not known yet", timeout=WAIT_MS)
            expect(page.locator("#health-text")).to_contain_text("alone", timeout=WAIT_MS)
            join = status_of(base).get("join_command")
            if join:  # a relay: the dashboard shows the command a friend copies
                expect(page.locator("#join-command-dash")).to_have_text(join)
            assert page.locator("#peers img").count() == 0  # a peer's strings are text, never markup
            expect(page.locator("#stat-mode")).to_contain_text("full fine-tune")

            # --- save a checkpoint: the token is asked for once, a wrong one refused ---
            rows = page.locator("#checkpoints tbody tr:not(.empty)")
            before = set(rows.all_inner_texts())
            page.click("#btn-checkpoint")
            expect(page.locator("#token-dialog")).to_be_visible()
            page.fill("#token-input", "not-the-token")
            page.click("#token-ok")
            expect(page.locator("#token-error")).to_contain_text("not this node's admin token")
            page.fill("#token-input", token)
            page.click("#token-ok")
            expect(page.locator("#token-dialog")).to_be_hidden()
            expect(page.locator("#notice")).to_contain_text("checkpoint", timeout=WAIT_MS)
            page.wait_for_function(
                f"() => document.querySelectorAll('#checkpoints tbody tr:not(.empty)').length > {len(before)}",
                timeout=WAIT_MS)
            new_rows = [r for r in rows.all() if r.inner_text() not in before]
            assert new_rows and new_rows[0].locator("a").first.get_attribute("href").startswith("/api/ui/checkpoints/")

            # --- download it: the link asks the node for a one-minute ticket with the token the page holds ---
            with page.expect_download(timeout=WAIT_MS) as download:
                new_rows[0].locator("a").first.click()
            assert download.value.suggested_filename.endswith("-model.zip")
            with zipfile.ZipFile(download.value.path()) as archive:
                assert archive.testzip() is None and any(n.endswith("unet/config.json") for n in archive.namelist())

            # --- screenshot of the dashboard ---
            page.wait_for_timeout(500)
            shot = page.screenshot(full_page=True)
            (tmp_path / "dashboard.png").write_bytes(shot)
            not_blank(shot)

            # --- relay settings: a wrong value is refused with its key named, a right one saved ---
            page.goto(base + "/#settings")
            expect(page.locator("#view-settings")).to_be_visible()
            expect(page.locator("#listen_host")).not_to_have_value("", timeout=WAIT_MS)
            page.fill("#ie_port_internal", "70000")
            page.click("#settings-save")
            expect(page.locator("#settings-error")).to_contain_text("ie_port_internal")
            expect(page.locator("#ie_port_internal")).to_have_attribute("aria-invalid", "true")
            settings_before = page.evaluate("fetch('/api/ui/settings').then(r => r.json())")["settings"]
            page.fill("#ie_port_internal", str(settings_before["ie_port_internal"]))
            page.fill("#public_address", "node.example.org")
            page.fill("#dht_port_internal", "40100")  # fixed: an external port needs one (a test node may use 0)
            page.fill("#dht_port_external", "40123")
            page.click("#settings-save")
            expect(page.locator("#settings-saved")).to_contain_text("Applied when the node restarts")
            expect(page.locator("#settings-error")).to_be_hidden()
            page.reload()
            expect(page.locator("#public_address")).to_have_value("node.example.org", timeout=WAIT_MS)
            expect(page.locator("#dht_port_external")).to_have_value("40123")
            expect(page.locator("#dht_port_internal")).to_have_value("40100")
            expect(page.locator("#after-restart")).to_contain_text("/dns/node.example.org/tcp/40123")

            # --- the join command a friend copies ---
            if join:
                expect(page.locator("#join-command")).to_have_text(join, timeout=WAIT_MS)
                page.click("#copy-join")
                assert page.evaluate("navigator.clipboard.readText()") == join
            page.evaluate("window.scrollTo(0, 0)")
            settings_shot = page.screenshot(full_page=True)
            (tmp_path / "settings.png").write_bytes(settings_shot)
            not_blank(settings_shot)

            # the URL a node prints carries the token in its fragment: a new tab takes it, then hides it
            tab = context.new_page()
            tab.goto(node_url)
            expect(tab.locator("#btn-token")).to_have_text("Admin ✓", timeout=WAIT_MS)
            assert "token" not in tab.url
            tab.close()

            keep = os.environ.get("SDSWARM_SCREENSHOTS")  # a folder to keep the screenshots in, for a look
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                for name in ("dashboard.png", "settings.png"):
                    shutil.copy(tmp_path / name, Path(keep) / name)
            assert not outside, f"the page reached outside the node: {outside}"
            assert not errors, f"errors in the page: {errors}"
        finally:
            browser.close()

