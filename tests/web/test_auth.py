from __future__ import annotations

import stat

from sdswarm.swarm.settings import NodeSettings, save_settings
from sdswarm.web.auth import TOKEN_FILE, load_or_create_token, token_from_headers, token_matches


def test_token_is_created_once_private_and_kept(tmp_path):
    token = load_or_create_token(tmp_path / "node")
    path = tmp_path / "node" / TOKEN_FILE
    assert len(token) >= 40 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(tmp_path / "node") == token  # the same at the next start
    assert not list((tmp_path / "node").glob(".admin_token.tmp-*"))


def test_each_node_gets_its_own_token(tmp_path):
    assert load_or_create_token(tmp_path / "a") != load_or_create_token(tmp_path / "b")


def test_token_never_lands_in_the_settings_file(tmp_path):
    token = load_or_create_token(tmp_path)
    save_settings(NodeSettings(), tmp_path)
    assert token not in (tmp_path / "node.yaml").read_text()


def test_a_loose_token_file_is_tightened_and_a_short_one_replaced(tmp_path):
    path = tmp_path / TOKEN_FILE
    path.write_text("a-token-long-enough-to-keep\n")
    path.chmod(0o644)
    assert load_or_create_token(tmp_path) == "a-token-long-enough-to-keep"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("short\n")
    replaced = load_or_create_token(tmp_path)
    assert replaced != "short" and len(replaced) >= 40


def test_token_comparison():
    assert token_matches("abc", "abc")
    assert not token_matches("abd", "abc")
    assert not token_matches("ab", "abc")
    assert not token_matches("", "abc")
    assert not token_matches(None, "abc")
    assert not token_matches("é", "abc")  # non-ASCII is compared, not an error


def test_token_from_headers():
    assert token_from_headers({"Authorization": "Bearer  tok "}) == "tok"
    assert token_from_headers({"Authorization": "bearer tok"}) == "tok"
    assert token_from_headers({"X-Admin-Token": "tok"}) == "tok"
    assert token_from_headers({"Authorization": "Basic tok"}) is None
    assert token_from_headers({"Authorization": "Bearer "}) is None
    assert token_from_headers({}) is None
