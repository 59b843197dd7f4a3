"""The kohya/diffusers options of the `train:` section: off by default, named when wrong, and doing what they say."""

from __future__ import annotations

import sys
import types

import hivemind
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import sdswarm.model.attention as attention
from sdswarm.config import ConfigError, load_config
from sdswarm.model.loading import TINY_MODEL_ID, load_components
from sdswarm.node import prepare_model
from sdswarm.swarm.network import stop_dht
from sdswarm.swarm.optimizer import ClipGradNorm, make_optimizer
from tests.conftest import ROOT

OPTIONS = {"mixed_precision": None, "min_snr_gamma": None, "noise_offset": 0.0, "gradient_checkpointing": False,
           "attention": "default", "optimizer_8bit": False, "cache_latents": False}


def test_all_off_by_default_and_in_the_howto_file():
    config = load_config(ROOT / "configs" / "sd_1-5.yaml")
    assert {key: getattr(config.train, key) for key in OPTIONS} == OPTIONS
    assert config.precision == "fp16"  # the how-to's fp16: True


@pytest.mark.parametrize(
    ("overrides", "precision"),
    [({}, "fp16"), ({"fp16": False}, "no"), ({"fp16": False, "train.mixed_precision": "bf16"}, "bf16"),
     ({"fp16": False, "train.mixed_precision": "fp16"}, "fp16"), ({"train.mixed_precision": "fp16"}, "fp16")],
)
def test_precision_the_howto_key_wins_for_fp16(overrides, precision):
    assert load_config(ROOT / "configs" / "sd_1-5.yaml", overrides).precision == precision


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ({"train.mixed_precision": "bf16"}, ["fp16: True", "train.mixed_precision: bf16", "fp16: False"]),
        ({"train.mixed_precision": "fp8"}, ["'train.mixed_precision'", "'fp8'", "'fp16', 'bf16' or 'no'"]),
        ({"train.min_snr_gamma": 0}, ["'train.min_snr_gamma'", "greater than 0"]),
        ({"train.noise_offset": -0.1}, ["'train.noise_offset'", "-0.1", "greater than or equal to 0"]),
        ({"train.attention": "flash"}, ["'train.attention'", "'flash'", "'default', 'sdpa' or 'xformers'"]),
        ({"train.cache_latents": "sometimes"}, ["'train.cache_latents'", "valid boolean"]),
    ],
)
def test_bad_option_values_are_named(override, names):
    with pytest.raises(ConfigError) as error:
        load_config(ROOT / "configs" / "sd_1-5.yaml", override)
    for name in names:
        assert name in str(error.value), (name, str(error.value))


# --- attention ------------------------------------------------------------------------------------------------


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample


def test_sdpa_is_set_everywhere_and_computes_what_plain_attention_computes():
    components = load_components(TINY_MODEL_ID)
    unet, vae = components.unet, components.vae
    unet.set_attn_processor(AttnProcessor())  # softmax(QK^T / sqrt(d)) V, written out in diffusers
    vae.set_attn_processor(AttnProcessor())
    reference = unet_output(unet)
    attention.set_attention([unet, vae], "sdpa")
    assert {type(p) for model in (unet, vae) for p in model.attn_processors.values()} == {AttnProcessor2_0}
    torch.testing.assert_close(unet_output(unet), reference, rtol=1e-5, atol=1e-5)


def test_default_leaves_the_loaded_processors():
    unet = load_components(TINY_MODEL_ID).unet
    unet.set_attn_processor(AttnProcessor())
    attention.set_attention([unet], "default")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}


def test_xformers_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(attention, "xformers_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install xformers.*train.attention: sdpa"):
        attention.set_attention([load_components(TINY_MODEL_ID).unet], "xformers")


# --- gradient checkpointing -------------------------------------------------------------------------------------


def forward_backward(components, calls: dict) -> list[torch.Tensor]:
    """One loss through text encoder and UNet; counts how often a checkpointed UNet resnet and the MLP inside a
    checkpointed text encoder layer run (transformers checkpoints a layer's forward, outside its own hooks)."""
    # a pre-hook: torch stops a recomputation as soon as it has what backward needs, before forward hooks run
    hooks = [module.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
             for key, module in (("resnet", components.unet.down_blocks[0].resnets[0]),
                                 ("text layer", components.text_encoder.encoder.layers[0].mlp))]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 77), generator=generator)
    context = components.text_encoder(ids).last_hidden_state
    sample = components.unet(torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([10, 500]),
                             encoder_hidden_states=context).sample
    sample.pow(2).mean().backward()
    for hook in hooks:
        hook.remove()
    return [p.grad.clone() for p in [*components.unet.parameters(), *components.text_encoder.parameters()]]


def test_gradient_checkpointing_recomputes_in_backward_and_gives_the_same_gradients():
    results = {}
    for on in (False, True):
        components = load_components(TINY_MODEL_ID)
        prepare_model(components, device=torch.device("cpu"), train_text_encoder=True, gradient_checkpointing=on)
        components.unet.train()
        components.text_encoder.train()
        calls = {"resnet": 0, "text layer": 0}
        results[on] = forward_backward(components, calls)
        # checkpointed: each block runs once forward and once more in backward to rebuild its activations
        assert calls == ({"resnet": 2, "text layer": 2} if on else {"resnet": 1, "text layer": 1})
    for without, with_ in zip(results[False], results[True], strict=True):
        torch.testing.assert_close(with_, without, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_leaves_a_frozen_text_encoder_alone():
    components = load_components(TINY_MODEL_ID)
    prepare_model(components, device=torch.device("cpu"), train_text_encoder=False, gradient_checkpointing=True)
    assert components.unet.is_gradient_checkpointing
    assert not components.text_encoder.is_activation_checkpointing


# --- 8-bit AdamW ----------------------------------------------------------------------------------------------


def small_optimizer(params, **kwargs) -> hivemind.Optimizer:
    from sdswarm.config import SwarmConfig

    dht = hivemind.DHT(start=True)
    try:
        return make_optimizer(
            dht=dht, params=params, batch_size_per_step=1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
            max_grad_norm=1e-6, verbose=False,
            swarm=SwarmConfig(target_batch_size=1, matchmaking_time=1, averaging_timeout=5, compression="none"),
            **kwargs,
        ), dht
    except BaseException:
        stop_dht(dht)
        raise


def test_8bit_without_bitsandbytes_names_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if it were not installed
    with pytest.raises(RuntimeError, match=r"pip install bitsandbytes"):
        small_optimizer([torch.nn.Parameter(torch.ones(3))], optimizer_8bit=True)


def test_8bit_uses_bitsandbytes_adamw8bit_clipped_and_on_the_gpu_side(monkeypatch):
    """bitsandbytes cannot be installed here: a stand-in module checks the wiring (class, clipping, no offload)."""

    class StandInAdamW8bit(torch.optim.AdamW):
        pass

    stand_in = types.ModuleType("bitsandbytes")
    stand_in.optim = types.SimpleNamespace(AdamW8bit=StandInAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", stand_in)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer, dht = small_optimizer([param], optimizer_8bit=True)
    try:
        inner = optimizer.state_averager.optimizer
        assert isinstance(inner, StandInAdamW8bit) and isinstance(inner, ClipGradNorm)
        assert not optimizer.offload_optimizer  # 8-bit state lives with the parameters, where its kernels run
        param.grad = torch.tensor([3.0, 0.0, 4.0])
        optimizer.step()
        assert inner.last_grad_norm == pytest.approx(5.0)
    finally:
        optimizer.shutdown()
        stop_dht(dht)


# --- all of them at once, through the node ------------------------------------------------------------------------


def test_a_short_run_with_every_option_on(tmp_path, monkeypatch):
    from sdswarm.node import run_mother
    from sdswarm.train.loop import Trainer
    from tests.conftest import tiny_overrides

    seen = {}
    original_run = Trainer.run

    def spy(self, stop):
        seen["trainer"] = self
        return original_run(self, stop)

    monkeypatch.setattr(Trainer, "run", spy)
    options = {"train.min_snr_gamma": 5.0, "train.noise_offset": 0.05, "train.gradient_checkpointing": True,
               "train.attention": "sdpa", "train.cache_latents": True, "fp16": False, "train.mixed_precision": "bf16"}
    config = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides(tmp_path, **{"train.max_steps": 6, **options}))
    summary = run_mother(config)

    assert summary.progress.step == 6 and summary.progress.skipped_steps == 0
    assert torch.isfinite(torch.tensor([summary.eval_loss_start, summary.eval_loss_end])).all()
    trainer = seen["trainer"]
    unet = trainer.components.unet
    assert unet.is_gradient_checkpointing and trainer.components.text_encoder.is_activation_checkpointing
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    assert (trainer.train.min_snr_gamma, trainer.train.noise_offset, trainer.precision) == (5.0, 0.05, "bf16")
    assert 0 < trainer.latent_cache.images_encoded <= 6 * config.train.batch_size
    assert all(p.dtype == torch.float32 for p in trainer.trainable)
