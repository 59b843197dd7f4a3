"""LoRA exports load in other tools' loaders and give the model that was trained."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from sdswarm.cli import main
from sdswarm.config import load_config
from sdswarm.model.loading import TINY_MODEL_ID, default_cache_dir, load_components
from sdswarm.model.lora import add_adapters, base_identity
from sdswarm.model.tiny import TINY_MODEL_DIRNAME
from sdswarm.train.checkpoint import Checkpoints, as_pipeline
from sdswarm.train.export import original_state_dict
from tests.conftest import ROOT, tiny_overrides
from tests.train.test_export import read_back

RANK, ALPHA = 4, 8.0  # alpha != rank: the exports must carry the scale


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA checkpoint whose adapters are far from their initial no-op (random B), and the model in memory."""
    folder = tmp_path_factory.mktemp("lora-export")
    config = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides(
        folder / "out", **{"train.lora": {"rank": RANK, "alpha": ALPHA}}))
    components = load_components(TINY_MODEL_ID)
    base = base_identity(TINY_MODEL_ID, components)
    params = add_adapters(components, config.train.lora, text_encoder=True, seed=config.seed)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # values fp16 holds exactly: a checkpoint stores the adapters (and their EMA) in fp16
        for param in params:
            param.add_(torch.randn(param.shape, generator=generator) * 0.05).copy_(param.half())
    state = {"progress": {"step": 7}, "ema": {"shadow": [(p.detach() + 0.01).half().float() for p in params],
                                                "num_updates": 3, "decay": 0.9, "warmup": True}}
    checkpoint = Checkpoints(folder / "checkpoints", keep=2, config_yaml=config.to_yaml()).save(
        7, components, state, lora_base=base)
    return folder, checkpoint, components


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), encoder_hidden_states=context).sample


def text_output(text_encoder) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(torch.arange(1, 78)[None] % 100).last_hidden_state


def fresh_pipeline() -> StableDiffusionPipeline:
    return as_pipeline(load_components(TINY_MODEL_ID))


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_both_lora_files_load_in_diffusers_and_reproduce_the_trained_model(trained, fmt):
    folder, checkpoint, components = trained
    out = folder / f"{fmt}.safetensors"
    assert main(["export", str(checkpoint), str(out), "--format", fmt]) == 0

    pipe = fresh_pipeline()
    plain = unet_output(pipe.unet)
    pipe.load_lora_weights(str(out))  # diffusers tells the layouts apart by their keys, as A1111/ComfyUI users do
    expected = unet_output(components.unet)
    assert (expected - plain).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(unet_output(pipe.unet), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(text_output(pipe.text_encoder), text_output(components.text_encoder),
                               rtol=1e-4, atol=1e-4)

    keys = load_file(out).keys()
    if fmt == "kohya":
        assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
        alphas = {load_file(out)[k].item() for k in keys if k.endswith(".alpha")}
        assert alphas == {ALPHA}
        with safe_open(out, "pt") as handle:
            assert handle.metadata()["ss_network_dim"] == str(RANK)
    else:
        assert all(k.startswith(("unet.", "text_encoder.")) for k in keys)


def test_merge_writes_one_model_file_that_from_single_file_loads(trained):
    folder, checkpoint, components = trained
    out = folder / "merged.safetensors"
    assert main(["export", str(checkpoint), str(out), "--merge"]) == 0
    pipe = read_back(out, default_cache_dir() / TINY_MODEL_DIRNAME)
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(components.unet), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(text_output(pipe.text_encoder), text_output(components.text_encoder),
                               rtol=1e-4, atol=1e-4)
    # the whole model, nothing LoRA-shaped left in it
    merged = load_file(out)
    assert not any("lora" in k for k in merged)
    assert merged.keys() == original_state_dict(load_components(TINY_MODEL_ID)).keys()


def test_ema_adapters_are_exported_with_ema(trained):
    folder, checkpoint, components = trained
    out, out_ema = folder / "plain.safetensors", folder / "ema.safetensors"
    assert main(["export", str(checkpoint), str(out)]) == 0
    assert main(["export", str(checkpoint), str(out_ema), "--ema"]) == 0
    plain, ema = load_file(out), load_file(out_ema)
    for key in plain:
        if not key.endswith(".alpha"):
            torch.testing.assert_close(ema[key], plain[key] + 0.01, rtol=2**-10, atol=2**-20)


def test_full_only_and_lora_only_options_are_refused(trained, tmp_path, capsys):
    folder, checkpoint, _ = trained
    assert main(["export", str(checkpoint), str(tmp_path / "x.safetensors"), "--half"]) == 2
    assert "--half applies to --merge only" in capsys.readouterr().err


def test_lora_options_on_a_full_checkpoint_are_refused(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "x.safetensors"), "--merge"]) == 2
    assert "full fine-tune's checkpoint: --merge and --format are for LoRA checkpoints" in capsys.readouterr().err
