"""A LoRA checkpoint's compact training state: AdamW's moments in about a byte each, back within fp8's precision."""

from __future__ import annotations

import io

import torch

from sdswarm.train.compact_state import FP8_KEY, compact, expand


def adamw_state(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i, shape in enumerate(shapes):
        # magnitudes as AdamW's moments have them: spread over orders of magnitude, some exactly zero
        scale = torch.logspace(-8, -3, shape[-1])
        exp_avg = torch.randn(shape, generator=generator) * scale
        exp_avg_sq = (torch.randn(shape, generator=generator) * scale) ** 2
        exp_avg[..., :3] = exp_avg_sq[..., :3] = 0
        state[i] = {"step": torch.tensor(17.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    return {"progress": {"step": 17}, "optimizer": {"state": {**state, "local_epoch": 5},
                                                    "param_groups": [{"lr": 1e-4, "params": list(state)}]},
            "scaler": {}, "ema": {"shadow": [torch.randn(shape, generator=generator) for shape in shapes],
                                  "num_updates": 3, "decay": 0.99, "warmup": True}}


def saved_size(state) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def test_moments_take_about_a_byte_each_and_come_back_within_fp8_precision():
    state = adamw_state([(512, 1000), (7, 30)])
    packed = compact(state)
    values = 2 * sum(s["exp_avg"].numel() for i, s in state["optimizer"]["state"].items() if i != "local_epoch")
    ema_bytes = 2 * sum(t.numel() for t in state["ema"]["shadow"])  # fp16
    assert saved_size(packed) - ema_bytes < 1.03 * values + 8192  # + torch.save's headers
    assert saved_size(state) > 3.9 * values

    loaded = expand(torch.load(io.BytesIO(_bytes(packed)), weights_only=True))
    for i in (0, 1):
        for key, tolerance in (("exp_avg", 0.0625), ("exp_avg_sq", 0.13)):
            original, back = state["optimizer"]["state"][i][key], loaded["optimizer"]["state"][i][key]
            assert back.dtype == torch.float32 and back.shape == original.shape
            big = original.abs() >= original.abs().amax() / 28_672  # fp8's normal range within a block
            relative = ((back - original).abs() / original.abs())[big & (original != 0)]
            assert relative.max() <= tolerance, (key, relative.max())
            assert torch.equal(back[original == 0], original[original == 0])  # zeros stay zero
        assert (loaded["optimizer"]["state"][i]["exp_avg_sq"] >= 0).all()  # AdamW takes its root
        assert torch.equal(loaded["optimizer"]["state"][i]["step"], state["optimizer"]["state"][i]["step"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert loaded["optimizer"]["state"]["local_epoch"] == 5 and loaded["progress"] == state["progress"]
    for original, back in zip(state["ema"]["shadow"], loaded["ema"]["shadow"], strict=True):
        assert back.dtype == torch.float16
        torch.testing.assert_close(back.float(), original, rtol=2**-11, atol=2**-24)


def test_diloco_states_have_their_inner_and_outer_moments_packed():
    inner = adamw_state([(64, 64)])["optimizer"]
    outer = {"state": {0: {"momentum_buffer": torch.randn(64, 64)}}, "param_groups": [{"params": [0]}]}
    packed = compact({"optimizer": {"sync": "local_steps", "inner": inner, "outer": outer, "local_epoch": 3}})
    assert FP8_KEY in packed["optimizer"]["inner"]["state"][0]["exp_avg_sq"]
    assert FP8_KEY in packed["optimizer"]["outer"]["state"][0]["momentum_buffer"]
    back = expand(packed)["optimizer"]
    torch.testing.assert_close(back["outer"]["state"][0]["momentum_buffer"], outer["state"][0]["momentum_buffer"],
                               rtol=0.0625, atol=1e-3)
    assert back["sync"] == "local_steps" and back["local_epoch"] == 3


def _bytes(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
