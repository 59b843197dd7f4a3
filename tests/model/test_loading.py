import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from sdswarm.data.aspect import AspectBucket, resize_to_aspect_bucket
from sdswarm.data.demo import plan_post, render
from sdswarm.model import loading
from sdswarm.model.loading import TINY_MODEL_ID, SDComponents, default_cache_dir, load_components
from sdswarm.model.text import PromptEncoder
from sdswarm.model.tiny import (
    TINY_MODEL_DIRNAME,
    TOKENIZER_ASSETS,
    build_tiny_model,
    tiny_text_captions,
    tiny_tokenizer,
)

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


# Training the VAE takes tens of seconds: tests that only need *a* build ask for a few steps.
QUICK = {"vae_steps": 2, "text_steps": 2}


@pytest.fixture(scope="module")
def tiny_path(sdswarm_cache: Path) -> Path:
    """The full tiny model in the session cache (tests/conftest.py), shared with every other test module."""
    path = sdswarm_cache / TINY_MODEL_DIRNAME
    assert default_cache_dir() == sdswarm_cache  # nothing here may build into ~/.cache
    load_components(TINY_MODEL_ID)  # builds it once per session, whichever test gets there first
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for rel in WEIGHT_FILES:
        out.update({f"{rel}:{k}": v for k, v in load_file(path / rel).items()})
    return out


def test_tokenizer_assets_are_contiguous() -> None:
    vocab = json.loads((TOKENIZER_ASSETS / "vocab.json").read_text(encoding="utf-8"))
    merges = (TOKENIZER_ASSETS / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(vocab.values()) == list(range(2048))
    assert merges[0] == "#version: 0.2" and len(merges) - 1 == 2048 - 514
    assert vocab["<|startoftext|>"] == 2046 and vocab["<|endoftext|>"] == 2047


def test_tokenizer_is_real_bpe() -> None:
    tok = tiny_tokenizer()
    ids = tok("a red circle on a blue background").input_ids
    assert ids[0] == tok.bos_token_id == 2046 and ids[-1] == tok.eos_token_id == 2047
    assert tok.convert_ids_to_tokens(ids[1:3]) == ["a</w>", "red</w>"]
    # A word far outside the 2048-token vocab must be split into several sub-tokens, not mapped to unk.
    word = tok("supercalifragilistic").input_ids[1:-1]
    assert len(word) > 3 and tok.unk_token_id not in word
    assert tok.decode(word).strip() == "supercalifragilistic"
    padded = tok("a cat", padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert padded.shape == (1, 77) and tok.pad_token == "<|endoftext|>"
    assert (padded[0, 4:] == tok.pad_token_id).all()
    long = tok("cat " * 200, padding="max_length", truncation=True).input_ids
    assert len(long) == 77 and long[-1] == tok.eos_token_id


def test_tiny_pipeline_renders(tiny_path: Path) -> None:
    assert {p.name for p in tiny_path.iterdir()} >= {"model_index.json", *loading.SUBFOLDERS}
    assert not list(tiny_path.parent.glob(".*.tmp")), "temp build dir left behind"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_path))
    assert pipe.safety_checker is None
    out = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    image = out.images[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 1


def test_load_components_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real_build = loading.build_tiny_model

    def counting_build(path: Path, seed: int = 0) -> Path:
        calls.append(path)
        return real_build(path, seed, **QUICK)

    monkeypatch.setattr(loading, "build_tiny_model", counting_build)
    first = load_components(TINY_MODEL_ID, cache_dir=tmp_path)
    assert calls == [tmp_path / TINY_MODEL_DIRNAME] and TINY_MODEL_DIRNAME == "tiny-sd-v6"
    mtime = (tmp_path / TINY_MODEL_DIRNAME / "model_index.json").stat().st_mtime_ns
    second = load_components(TINY_MODEL_ID, cache_dir=tmp_path)
    assert len(calls) == 1
    assert (tmp_path / TINY_MODEL_DIRNAME / "model_index.json").stat().st_mtime_ns == mtime

    for comps in (first, second):
        assert isinstance(comps, SDComponents)
        assert isinstance(comps.unet, UNet2DConditionModel) and isinstance(comps.vae, AutoencoderKL)
        assert isinstance(comps.text_encoder, CLIPTextModel) and isinstance(comps.tokenizer, CLIPTokenizer)
        assert isinstance(comps.noise_scheduler, DDPMScheduler)
        for module in (comps.unet, comps.vae, comps.text_encoder):
            assert all(p.dtype == torch.float32 for p in module.parameters())
    tok = second.tokenizer
    assert tok.model_max_length == 77 and tok.pad_token == "<|endoftext|>"
    assert tok("a red circle").input_ids == tiny_tokenizer()("a red circle").input_ids
    sched = second.noise_scheduler.config
    # SD's betas rescaled to zero terminal SNR, v-prediction: what lets the demo learn its prompts in minutes
    assert (sched.num_train_timesteps, sched.prediction_type, sched.beta_schedule, sched.rescale_betas_zero_snr) == (
        1000,
        "v_prediction",
        "scaled_linear",
        True,
    )


def test_loaded_parts_fit_together(tiny_path: Path) -> None:
    comps = load_components(str(tiny_path))
    ids = comps.tokenizer(["a blue square"], padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = comps.text_encoder(ids.input_ids)[0]
        image = torch.rand(2, 3, 64, 64) * 2 - 1
        latents = comps.vae.encode(image).latent_dist.sample() * comps.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.tensor([10, 900])
        noisy = comps.noise_scheduler.add_noise(latents, noise, t)
        pred = comps.unet(noisy, t, hidden.expand(2, -1, -1)).sample
    assert hidden.shape == (1, 77, 32)
    assert latents.shape == (2, 4, 16, 16) and torch.isfinite(latents).all()
    assert latents.abs().max() < 10  # a random VAE must still give SD-like small latents
    assert pred.shape == latents.shape and torch.isfinite(pred).all()


def test_same_seed_same_weights(tmp_path: Path) -> None:
    # A few VAE and text encoder steps run the same code as the full build: enough to catch any unseeded randomness.
    vae_steps = 5
    threads_before = torch.get_num_threads()
    torch.set_num_threads(3)  # not the build's own count, which must not decide the weights
    try:
        ref = _weights(build_tiny_model(tmp_path / "ref", seed=0, vae_steps=vae_steps, text_steps=vae_steps))
        assert torch.get_num_threads() == 3  # the build's fixed thread count is not left behind
    finally:
        torch.set_num_threads(threads_before)
    again = _weights(build_tiny_model(tmp_path / "again", seed=0, vae_steps=vae_steps, text_steps=vae_steps))
    assert ref.keys() == again.keys() and all(torch.equal(ref[k], again[k]) for k in ref)
    other = _weights(build_tiny_model(tmp_path / "other", seed=1, vae_steps=vae_steps, text_steps=vae_steps))
    assert any(not torch.equal(ref[k], other[k]) for k in ref)


def _demo_images(seed: int, count: int) -> torch.Tensor:
    """Rendered demo posts the VAE never trained on, resized as the trainer does, in [-1, 1]."""
    images = [resize_to_aspect_bucket(render(plan_post(i, seed)), AspectBucket(64, 64)) for i in range(1, count + 1)]
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def test_tiny_vae_reconstructs_demo_images(tiny_path: Path) -> None:
    vae = AutoencoderKL.from_pretrained(tiny_path, subfolder="vae").eval()
    torch.manual_seed(0)
    untrained = AutoencoderKL.from_config(vae.config).eval()
    images = _demo_images(seed=4242, count=16)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        error = (vae.decode(posterior.mode()).sample.clamp(-1, 1) - images).abs().mean().item()
        random_error = (untrained.decode(untrained.encode(images).latent_dist.mode()).sample.clamp(-1, 1) - images)
        random_error = random_error.abs().mean().item()
        scaled_std = (posterior.sample() * vae.config.scaling_factor).std().item()
    # On a 0..2 scale: ~0.03 is a slightly soft copy of the picture; a random VAE is ~0.7 (noise).
    assert error < 0.08, f"tiny VAE reconstructs demo images badly: mean abs error {error:.3f}"
    assert random_error > 0.3, random_error
    # The scaling factor is computed, as SD's 0.18215 was: scaled latents have about unit variance.
    assert vae.config.scaling_factor != 0.18215 and 0.7 < scaled_std < 1.4, scaled_std


def test_tiny_vae_decodes_a_blend_of_latents_to_the_blend_of_colours(tiny_path: Path) -> None:
    # An uncertain UNet predicts a mean of latents; it must look like a mean of the pictures (a dark yellow between
    # yellow and black), not like another colour of the palette, or samples break up into patches of wrong colours.
    vae = AutoencoderKL.from_pretrained(tiny_path, subfolder="vae").eval()
    images = _demo_images(seed=4242, count=16)
    others = images.roll(1, dims=0)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
        blend = vae.decode((latents + latents.roll(1, dims=0)) / 2).sample.clamp(-1, 1)
    error = (blend - (images + others) / 2).abs().mean().item()
    assert error < 0.2, f"a blend of two latents decodes {error:.3f} from the blend of the two images (0..2 scale)"


def test_build_keeps_existing_folder(tmp_path: Path) -> None:
    target = build_tiny_model(tmp_path / "m", seed=0, **QUICK)
    before = (target / "model_index.json").stat().st_mtime_ns
    weights = _weights(target)
    # A late builder losing the race must discard its copy, not clobber or nest inside the winner's.
    assert build_tiny_model(target, seed=1, **QUICK) == target
    assert (target / "model_index.json").stat().st_mtime_ns == before
    assert sorted(os.listdir(tmp_path)) == ["m"]
    after = _weights(target)
    assert all(torch.equal(weights[k], after[k]) for k in weights)


def test_concurrent_builders(tmp_path: Path) -> None:
    target = tmp_path / "race"
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            build_tiny_model(target, **QUICK)
        except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert sorted(os.listdir(tmp_path)) == ["race"]
    assert isinstance(load_components(str(target)), SDComponents)


def test_missing_folder_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_components(str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_components("./nowhere/at/all")


def test_folder_without_layout_names_path(tmp_path: Path) -> None:
    bad = tmp_path / "not-diffusers"
    (bad / "unet").mkdir(parents=True)
    with pytest.raises(ValueError, match=str(bad)) as err:
        load_components(str(bad))
    assert "text_encoder" in str(err.value)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SDSWARM_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("SDSWARM_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "sdswarm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "sdswarm"


def test_pickled_weights_are_never_loaded(tiny_path: Path, tmp_path: Path) -> None:
    """A model whose UNet comes as a pickled .bin (which can run code when unpickled) is refused, naming the fix."""
    import shutil

    from sdswarm.model.loading import ModelUnavailable

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_path, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), pickled / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelUnavailable, match="safetensors files only") as err:
        load_components(str(pickled))
    assert str(pickled) in str(err.value)


def _colour_accuracy(text_encoder: CLIPTextModel) -> tuple[float, float]:
    """How well the mean hidden state tells a caption's shape colour and background colour apart (nearest centroid
    on unseen captions of one shape on one background)."""
    captions, tags = tiny_text_captions(seed=7, count=800)
    rows = [(c, t) for c, t in zip(captions, tags, strict=True) if "1shape" in t and "two-tone_background" not in t]
    shape = [next(tag.split("_")[0] for tag in t if "_" in tag and not tag.endswith("_background")) for _, t in rows]
    background = [next(tag.split("_")[0] for tag in t if tag.endswith("_background")) for _, t in rows]
    encoder = PromptEncoder(tiny_tokenizer(), text_encoder.eval(), clip_penultimate=True)
    with torch.no_grad():
        pooled = encoder([c for c, _ in rows]).mean(dim=1)
    split = len(rows) * 2 // 3
    accuracies = []
    for labels in (shape, background):
        centroids = {label: pooled[:split][[x == label for x in labels[:split]]].mean(0) for label in set(labels)}
        names = list(centroids)
        nearest = torch.cdist(pooled[split:], torch.stack([centroids[n] for n in names])).argmin(1)
        accuracies.append(sum(names[i] == want for i, want in zip(nearest.tolist(), labels[split:], strict=True))
                          / (len(rows) - split))
    return accuracies[0], accuracies[1]


def test_tiny_text_encoder_tells_the_shapes_colour_from_the_backgrounds(tiny_path: Path) -> None:
    # SD's text encoder comes pretrained; the tiny one is taught at build time which tags a caption holds, so
    # "red circle, blue background" and "blue circle, red background" mean different things to it.
    built = CLIPTextModel.from_pretrained(tiny_path, subfolder="text_encoder")
    torch.manual_seed(0)
    untrained = CLIPTextModel(built.config)
    shape, background = _colour_accuracy(built)
    untrained_shape, untrained_background = _colour_accuracy(untrained)
    assert shape > 0.9 and background > 0.9, (shape, background)
    assert untrained_shape < 0.6 and untrained_background < 0.6, (untrained_shape, untrained_background)
