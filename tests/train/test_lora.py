"""LoRA mode on one node: adapters learn, the base stays bit-identical, checkpoints hold adapters only and resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sdswarm.config import LoraConfig, load_config
from sdswarm.model.loading import TINY_MODEL_ID, load_components
from sdswarm.model.lora import (
    ADAPTER_FILE,
    BASE_FILE,
    BaseModelMismatch,
    adapter_parameters,
    adapter_state,
    add_adapters,
    base_identity,
)
from sdswarm.node import run_mother
from sdswarm.train.checkpoint import STATE_FILE, load_training_state
from sdswarm.train.compact_state import FP8_KEY
from sdswarm.train.loop import Trainer
from tests.conftest import LOOPBACK, ROOT, tiny_overrides

LORA = {"train.lora": {"rank": 4}}


def lora_config(out, **extra):
    return load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides(out, **LORA, **extra))


def base_weights(components) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v for k, v in components.unet.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in components.text_encoder.state_dict().items()})
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in state.items() if ".lora_" not in k}


def test_adapters_start_the_same_on_every_peer_and_only_they_train():
    first, second = load_components(TINY_MODEL_ID), load_components(TINY_MODEL_ID)
    torch.manual_seed(123)  # the caller's RNG does not matter, and is left as it was
    params = add_adapters(first, LoraConfig(rank=4), text_encoder=True, seed=42)
    after = torch.random.get_rng_state()
    torch.manual_seed(7)
    other = add_adapters(second, LoraConfig(rank=4), text_encoder=True, seed=42)
    torch.manual_seed(123)
    assert torch.equal(after, torch.random.get_rng_state())
    assert len(params) == len(other) > 0
    for a, b in zip(params, other, strict=True):
        assert torch.equal(a, b) and a.requires_grad and a.dtype == torch.float32
    trainable = [p for m in (first.unet, first.text_encoder) for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params} == {id(p) for p in adapter_parameters(first)}
    # kohya's targets: every transformer block's attention, feed-forward and projections; the text encoder's layers
    unet_names = [n for n, p in first.unet.named_parameters() if ".lora_A." in n]
    assert any(".attn2.to_k." in n for n in unet_names) and any(".ff.net.2." in n for n in unet_names)
    assert any(".proj_in." in n for n in unet_names)
    assert any(".mlp.fc1." in n for n, _ in first.text_encoder.named_parameters())
    # a different seed draws different adapters
    third = load_components(TINY_MODEL_ID)
    assert not torch.equal(add_adapters(third, LoraConfig(rank=4), text_encoder=True, seed=43)[0], params[0])


def test_a_lora_run_lowers_the_loss_keeps_the_base_and_saves_adapters_only(tmp_path):
    config = lora_config(tmp_path, **{"train.max_steps": 40, "output.checkpoint_every": 20, "lr": 1e-2})
    base = base_weights(load_components(TINY_MODEL_ID))
    captured = {}
    original_run = Trainer.run

    def run(self, stop):
        captured["trainer"] = self
        return original_run(self, stop)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "run", run)
        summary = run_mother(config, settings=LOOPBACK)
    assert summary.progress.step == 40 and summary.progress.skipped_steps == 0
    assert summary.eval_loss_end < 0.95 * summary.eval_loss_start, summary

    trainer = captured["trainer"]
    after = base_weights(trainer.components)
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base), "a base weight changed"
    assert all(".lora_" in n for m in (trainer.components.unet, trainer.components.text_encoder)
               for n, p in m.named_parameters() if p.requires_grad)
    # hivemind was handed the adapters and nothing else
    assert [id(p) for p in trainer.optimizer.state_averager.main_parameters] == [id(p) for p in trainer.trainable]
    assert {id(p) for p in trainer.trainable} == {id(p) for p in adapter_parameters(trainer.components)}

    checkpoint = tmp_path / "checkpoints" / "step_00000040"
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted([ADAPTER_FILE, BASE_FILE, "checkpoint.json",
                                                                   "config.yaml", "training_state.pt"])
    identity = json.loads((checkpoint / BASE_FILE).read_text())
    assert identity == {"model": TINY_MODEL_ID, "sha256": base_identity(TINY_MODEL_ID,
                                                                        load_components(TINY_MODEL_ID)).sha256}
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert metrics and (tmp_path / "samples" / "step_00000040.png").is_file()


def test_resume_in_lora_mode_continues_the_step_count_adapters_and_optimizer_state(tmp_path, monkeypatch):
    first = {}
    original_run = Trainer.run

    def run_and_keep(self, stop):
        progress = original_run(self, stop)
        first["adapters"] = {k: v.clone() for k, v in adapter_state(self.components).items()}
        first["moments"] = self.optimizer.state_dict()["state"]
        return progress

    monkeypatch.setattr(Trainer, "run", run_and_keep)
    run_mother(lora_config(tmp_path), settings=LOOPBACK)
    checkpoint = tmp_path / "checkpoints" / "step_00000012"
    saved = load_training_state(checkpoint)
    saved_adapters = load_file(checkpoint / ADAPTER_FILE)
    # compact: fp16 adapters, AdamW's moments in 8 bits (about 4 bytes per adapter parameter instead of 12)
    assert {v.dtype for v in saved_adapters.values()} == {torch.float16}
    raw = torch.load(checkpoint / STATE_FILE, weights_only=True)["optimizer"]["state"]
    assert {raw[i][key][FP8_KEY].dtype for i in raw if i != "local_epoch" for key in ("exp_avg", "exp_avg_sq")} == {
        torch.float8_e4m3fn}
    captured = {}

    def capture(self, stop):
        captured["trainer"] = self
        return self.progress

    monkeypatch.setattr(Trainer, "run", capture)
    run_mother(lora_config(tmp_path), settings=LOOPBACK, resume=True)
    trainer = captured["trainer"]
    assert trainer.progress.step == 12 and trainer.lora_base is not None
    restored = trainer.optimizer.state_dict()
    assert restored["state"]["local_epoch"] == saved["optimizer"]["state"]["local_epoch"] > 0
    for index, expected in saved["optimizer"]["state"].items():
        if index != "local_epoch":
            for key, value in expected.items():
                torch.testing.assert_close(restored["state"][index][key], value, rtol=0, atol=0)
                # and close to what the first run held: fp8 keeps each moment within 6.25 % (the second: its root)
                live = first["moments"][index][key]
                tolerance = {"step": 0.0, "exp_avg": 0.0625, "exp_avg_sq": 0.13}[key]
                torch.testing.assert_close(restored["state"][index][key], live, rtol=tolerance,
                                           atol=float(live.abs().max()) / 20_000)
    # the adapters are the checkpoint's, not a fresh draw (the first run's, to fp16's precision); and they are what
    # hivemind steps
    state = adapter_state(trainer.components)
    assert state.keys() == saved_adapters.keys() == first["adapters"].keys()
    assert all(torch.equal(state[k], saved_adapters[k].float()) for k in state)
    for key, value in first["adapters"].items():
        torch.testing.assert_close(state[key], value, rtol=2**-11, atol=2**-24)
    assert any(saved_adapters[k].abs().sum() > 0 for k in saved_adapters if ".lora_B." in k)  # B moved from zero


def test_resuming_adapters_on_another_base_is_refused_naming_both(tmp_path, monkeypatch):
    run_mother(lora_config(tmp_path, **{"train.max_steps": 2}), settings=LOOPBACK)
    identity = tmp_path / "checkpoints" / "step_00000002" / BASE_FILE
    identity.write_text(json.dumps({"model": "other/base", "sha256": "ab" * 32}))
    with pytest.raises(BaseModelMismatch) as refused:
        run_mother(lora_config(tmp_path), settings=LOOPBACK, resume=True)
    message = str(refused.value)
    assert "builtin:tiny" in message and "other/base" in message and "abababab" in message
