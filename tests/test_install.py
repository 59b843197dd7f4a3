"""`pip install` from a built wheel brings everything the package reads from disk (web UI, tiny tokenizer).

The wheel is installed with --no-deps into a fresh virtualenv (the dependencies are the pinned stack, gigabytes
with torch; how they install is pip's business), so this checks what is ours: the files in the wheel, the
`sdswarm` entry point, and that the installed package finds its data without the source tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import venv
import zipfile

from tests.conftest import ROOT

DATA_FILES = (
    "sdswarm/web/static/index.html",
    "sdswarm/web/static/app.js",
    "sdswarm/web/static/style.css",
    "sdswarm/web/static/vendor/uplot/uPlot.iife.min.js",
    "sdswarm/model/tiny_tokenizer/vocab.json",
    "sdswarm/model/tiny_tokenizer/merges.txt",
)


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    # without PYTHONPATH: a source tree on it would make pip (and Python) take it for the installed package
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_the_wheel_carries_the_package_data_and_installs_into_a_fresh_virtualenv(tmp_path):
    # no build isolation: setuptools from this environment, no download
    run(sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
        "-w", str(tmp_path / "dist"), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("sdswarm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [f for f in DATA_FILES if f not in names], sorted(n for n in names if not n.endswith(".py"))
    assert not [n for n in names if n.startswith("tests/")], "the tests do not belong in the wheel"

    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    run(str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel))
    # from outside the source tree and with a clean path, so only the installed copy can be found
    check = textwrap.dedent("""
        import json, sys, importlib.metadata as meta, importlib.resources as res
        root = res.files("sdswarm")
        print(json.dumps({
            "location": str(root),
            "present": [p for p in sys.argv[1:] if (root / p.removeprefix("sdswarm/")).is_file()],
            "scripts": [e.name for e in meta.entry_points(group="console_scripts") if e.value == "sdswarm.cli:main"],
            "version": meta.version("sdswarm"),
        }))
    """)
    found = json.loads(run(str(python), "-c", check, *DATA_FILES, cwd=tmp_path).stdout)
    assert str(tmp_path / "venv") in found["location"], found
    assert found["present"] == list(DATA_FILES), found
    assert found["scripts"] == ["sdswarm"] and found["version"] == "0.1.0"
    assert (tmp_path / "venv" / "bin" / "sdswarm").is_file()
