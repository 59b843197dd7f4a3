from __future__ import annotations

import math
from pathlib import Path

from sdswarm.web.redact import Redactor


def test_output_folder_home_and_other_paths(tmp_path):
    out = tmp_path / "run" / "output"
    redact = Redactor(out, secrets=["s3cret-token"])
    assert redact.text(f"saved checkpoint {out}/checkpoints/step_00000010") == \
        "saved checkpoint <output>/checkpoints/step_00000010"
    assert redact.text(f"cache in {Path.home()}/.cache/sdswarm") == "cache in ~/.cache/sdswarm"
    assert redact.text("reading '/tmp/somewhere/else/data.db'") == "reading '…/data.db'"
    assert redact.text(f"{tmp_path}/run/outputs-2/x") == "…/x"  # a sibling of the output folder is not it
    assert redact.text("token s3cret-token here") == "token <redacted> here"


def test_addresses_and_urls_are_left_alone(tmp_path):
    redact = Redactor(tmp_path)
    for text in ("/ip4/203.0.113.7/tcp/31337/p2p/QmPeer", "/dns/node.example.org/tcp/40123",
                 "sdswarm join 127.0.0.1:8765", "/api/ui/checkpoints/step_00000010/zip",
                 "http://203.0.113.7:8765/tmp/file", "loss 0.12/0.34", "epoch 3/4"):
        assert redact.text(text) == text


def test_json_values():
    redact = Redactor(Path("/nonexistent/out"))
    value = {"loss": math.nan, "rate": math.inf, "ok": True, "n": 3, "x": 0.5, "none": None,
             "paths": [Path("/nonexistent/out/a"), "/nonexistent/out"], "nested": {"k": (1, 2)}}
    assert redact(value) == {"loss": None, "rate": None, "ok": True, "n": 3, "x": 0.5, "none": None,
                             "paths": ["<output>/a", "<output>"], "nested": {"k": [1, 2]}}
