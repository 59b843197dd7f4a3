#!/usr/bin/env python
"""The how-to's entry point: `python server.py -m configs/sd_1-5.yaml` starts a mother node."""

import sys
from pathlib import Path

# run from a plain clone too, without `pip install -e .`
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from sdswarm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["server", *sys.argv[1:]]))
