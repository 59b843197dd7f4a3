from __future__ import annotations

import importlib.util

import hivemind.compression.serialization as serialization
import pytest

from sdswarm.swarm.optimizer import COMPRESSIONS, check_compression


@pytest.mark.parametrize("name", sorted(COMPRESSIONS))
def test_every_compression_the_config_offers_round_trips_here(name):
    if name == "blockwise8bit" and importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(RuntimeError, match=r"(?s)'blockwise8bit' does not work.*bitsandbytes package"):
            check_compression(name)
        return
    check_compression(name)  # hivemind 1.1.12's 8-bit decoder failed on numpy 2.4: partial rounds, silently


def test_a_codec_that_cannot_decode_stops_the_node_with_the_fix(monkeypatch):
    def broken(serialized_tensor):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setattr(serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"], "extract", broken)
    with pytest.raises(RuntimeError, match=r"swarm.compression 'uniform8bit' does not work.*numpy<2.4.*scaled_fp16"):
        check_compression("uniform8bit")
