"""The single-file export: original SD layout, read back by diffusers' own single-file loader, weight for weight."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from sdswarm.model.ema import EMA
from sdswarm.model.loading import TINY_MODEL_DIRNAME, TINY_MODEL_ID, default_cache_dir, load_components
from sdswarm.train.checkpoint import Checkpoints, as_pipeline
from sdswarm.train.export import export_single_file, original_state_dict

PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_folder():
    load_components(TINY_MODEL_ID)  # builds it once into the session cache
    return default_cache_dir() / TINY_MODEL_DIRNAME


def read_back(path, config_folder) -> StableDiffusionPipeline:
    """diffusers' loader for original-layout files, configured from a local diffusers folder (no downloads)."""
    return StableDiffusionPipeline.from_single_file(str(path), config=str(config_folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)


def assert_same_weights(got, expected, name: str, changed: float = 0.0) -> None:
    got, expected = got.state_dict(), expected.state_dict()
    assert got.keys() == expected.keys(), f"{name}: {sorted(set(got) ^ set(expected))[:5]}"
    for key, value in expected.items():
        assert torch.equal(got[key], value + changed), f"{name} {key} differs"


def test_tiny_checkpoint_round_trips_through_diffusers_single_file_loader(tiny_folder, tmp_path):
    out = export_single_file(tiny_folder, tmp_path / "tiny.safetensors", use_ema=False)
    original, loaded = load_components(str(tiny_folder)), read_back(out, tiny_folder)
    for part in PARTS:
        assert_same_weights(getattr(loaded, part), getattr(original, part), part)
    with safe_open(str(out), "pt") as handle:
        prefixes = {key.split(".")[0] for key in handle.keys()}  # noqa: SIM118 (not a dict)
        assert handle.metadata()["modelspec.prediction_type"] == "v"  # the tiny model is v-prediction
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}


# --- SD 1.x's own shape, against the published conversion ---------------------------------------------------------


def sd15_shaped(tiny) -> dict:
    """SD 1.5's block structure (4 levels, 2 layers, attention in the first 3 down / last 3 up) at toy width."""
    channels = (32, 64, 96, 96)  # grows like SD's 320, 640, 1280, 1280
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=channels, layers_per_block=2, cross_attention_dim=32,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(block_out_channels=channels, layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return dataclasses.replace(tiny, unet=unet, vae=vae)


def reference_names(unet_keys, vae_keys) -> dict[str, str]:
    """diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py for SD 1.x, written out (its fixed
    4 blocks x 2 layers; VAE attention under today's names): diffusers key -> original key."""
    unet_map = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
                ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    resnet_map = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                  ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    layer_map = []
    for i in range(4):
        for j in range(2):
            layer_map.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                layer_map.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            layer_map.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                layer_map.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            layer_map.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            layer_map.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    layer_map.append(("middle_block.1.", "mid_block.attentions.0."))
    layer_map += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]

    names = {}
    for key in unet_keys:
        name = next((sd + key[len(hf):] for sd, hf in unet_map if key.startswith(hf)), key)
        if "resnets" in key:
            for sd, hf in resnet_map:
                name = name.replace(hf, sd)
        for sd, hf in layer_map:
            name = name.replace(hf, sd)
        names["unet." + key] = "model.diffusion_model." + name

    vae_map = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"),
               ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        vae_map += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(2)]
        if i < 3:
            vae_map += [(f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
                        (f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")]
        vae_map += [(f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(3)]
    vae_map += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    attention_map = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                     ("proj_out.", "to_out.0.")]
    for key in vae_keys:
        name = key
        for sd, hf in vae_map:
            name = name.replace(hf, sd)
        if "attentions" in key:
            for sd, hf in attention_map:
                name = name.replace(hf, sd)
        names["vae." + key] = "first_stage_model." + name
    return names


# names as they stand in the SD 1.5 checkpoint every UI loads
SD15_KEYS = [
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.middle_block.2.emb_layers.1.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.0.downsample.conv.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.encoder.norm_out.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
    "first_stage_model.decoder.up.0.block.2.conv2.weight",
    "first_stage_model.post_quant_conv.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
]


def test_sd15_shaped_model_gets_the_published_names_and_round_trips(tiny_folder, tmp_path):
    components = sd15_shaped(load_components(str(tiny_folder)))
    folder = tmp_path / "sd15-shaped"
    as_pipeline(components).save_pretrained(folder, safe_serialization=True)

    ours = original_state_dict(components)
    expected = reference_names(components.unet.state_dict(), components.vae.state_dict())
    misnamed = [f"{dotted} -> {name}" for dotted, name in expected.items() if name not in ours]
    assert not misnamed, f"named otherwise than the reference: {misnamed[:5]}"
    for dotted, name in expected.items():
        part, key = dotted.split(".", 1)
        value = getattr(components, part).state_dict()[key]
        if name.startswith("first_stage_model.") and ".mid.attn_1." in name and value.ndim == 2:
            value = value[:, :, None, None]  # the script's reshape_weight_for_sd
        assert torch.equal(ours[name], value), name
    text = {k for k in ours if k.startswith("cond_stage_model.")}
    assert len(ours) == len(expected) + len(text) == len(expected) + len(components.text_encoder.state_dict())
    assert ours["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (96, 96, 1, 1)
    assert set(SD15_KEYS) <= set(ours)

    out = export_single_file(folder, tmp_path / "sd15.safetensors", use_ema=False)
    loaded = read_back(out, folder)
    for part in PARTS:
        assert_same_weights(getattr(loaded, part), getattr(components, part), part)


# --- EMA, half precision, refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_ema_weights_are_exported_for_the_trained_parts(tiny_folder, tmp_path, train_text_encoder):
    components = load_components(str(tiny_folder))
    trained = list(components.unet.parameters())
    if train_text_encoder:
        trained += list(components.text_encoder.parameters())
    ema = EMA(trained, decay=0.99)
    for shadow in ema.shadow:
        shadow.add_(0.25)  # an EMA that differs from the weights by a known amount
    checkpoint = Checkpoints(tmp_path / "checkpoints", keep=1, config_yaml="{}\n").save(
        7, components, {"progress": {"step": 7}, "ema": ema.state_dict()}, wait=True)

    loaded = read_back(export_single_file(checkpoint, tmp_path / "ema.safetensors", use_ema=True), tiny_folder)
    assert_same_weights(loaded.unet, components.unet, "unet", changed=0.25)
    assert_same_weights(loaded.text_encoder, components.text_encoder, "text encoder",
                        changed=0.25 if train_text_encoder else 0.0)
    assert_same_weights(loaded.vae, components.vae, "vae")
    with safe_open(str(tmp_path / "ema.safetensors"), "pt") as handle:
        assert handle.metadata()["sdswarm.ema"] == "true" and handle.metadata()["sdswarm.step"] == "7"

    plain = read_back(export_single_file(checkpoint, tmp_path / "plain.safetensors", use_ema=False), tiny_folder)
    assert_same_weights(plain.unet, components.unet, "unet")


def test_half_stores_every_float_as_fp16(tiny_folder, tmp_path):
    out = export_single_file(tiny_folder, tmp_path / "half.safetensors", use_ema=False, half=True)
    full = original_state_dict(load_components(str(tiny_folder)))
    with safe_open(str(out), "pt") as handle:
        assert set(handle.keys()) == set(full)
        for key in handle.keys():  # noqa: SIM118 (not a dict)
            assert torch.equal(handle.get_tensor(key), full[key].half()), key


def test_refusals_are_explained(tiny_folder, tmp_path):
    with pytest.raises(ValueError, match="no EMA weights"):
        export_single_file(tiny_folder, tmp_path / "x.safetensors", use_ema=True)
    components = load_components(str(tiny_folder))
    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=4, hidden_act="gelu")  # SD 2.x's OpenCLIP uses gelu
    with pytest.raises(ValueError, match="SD 1.x"):
        original_state_dict(dataclasses.replace(components, text_encoder=CLIPTextModel(config)))
    assert not (tmp_path / "x.safetensors").exists()
