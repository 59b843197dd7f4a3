"""Checkpoints: folders every tool reads, frozen parts linked not rewritten, written in the background from a copy."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdswarm.model.loading import TINY_MODEL_ID, load_components
from sdswarm.model.text import PromptEncoder
from sdswarm.train.checkpoint import INFO_FILE, Checkpoints, checkpoint_step, load_training_state

TF4_PYTHON = Path(os.environ.get("SDSWARM_TF4_PYTHON", "/tmp/venv-tf4/bin/python"))
PROMPT = "original, 1shape, blue background, circle, red circle"


@pytest.fixture
def components():
    return load_components(TINY_MODEL_ID)


def state(step: int) -> dict:
    return {"progress": {"step": step}, "optimizer": {"moment": torch.full((3,), float(step))}, "ema": None}


def save(checkpoints: Checkpoints, step: int, components) -> Path:
    return checkpoints.save(step, components, state(step), wait=True)


def test_the_folder_has_the_names_transformers_4_and_5_both_read(components, tmp_path):
    folder = save(Checkpoints(tmp_path, keep=2), 5, components)

    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("text_model.") for k in keys), keys[:3]
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in (folder / "tokenizer").iterdir()}
    # and this transformers (5.x) reads the prefixed keys back, weight for weight
    loaded = load_components(str(folder))
    for key, value in components.text_encoder.state_dict().items():
        assert torch.equal(loaded.text_encoder.state_dict()[key], value), key
    assert loaded.tokenizer(PROMPT).input_ids == components.tokenizer(PROMPT).input_ids
    assert checkpoint_step(folder) == 5 and json.loads((folder / INFO_FILE).read_text())["step"] == 5


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_frozen_parts_are_linked_and_every_folder_loads_on_its_own(components, tmp_path, train_text_encoder):
    checkpoints = Checkpoints(tmp_path, keep=2, train_text_encoder=train_text_encoder)
    first = save(checkpoints, 1, components)
    with torch.no_grad():
        components.unet.conv_in.weight.add_(1.0)
    second = save(checkpoints, 2, components)

    def inode(folder: Path, rel: str) -> int:
        return (folder / rel).stat().st_ino

    weights = "diffusion_pytorch_model.safetensors"
    assert inode(first, f"vae/{weights}") == inode(second, f"vae/{weights}")
    assert inode(first, "tokenizer/vocab.json") == inode(second, "tokenizer/vocab.json")
    assert inode(first, f"unet/{weights}") != inode(second, f"unet/{weights}")
    text = "text_encoder/model.safetensors"
    assert (inode(first, text) == inode(second, text)) is not train_text_encoder

    third = save(checkpoints, 3, components)  # prunes the first: the others keep their (linked) files
    assert [p.name for p in checkpoints.all()] == [second.name, third.name]
    loaded = load_components(str(second))
    assert torch.equal(loaded.unet.conv_in.weight, components.unet.conv_in.weight)
    assert torch.equal(loaded.vae.decoder.conv_out.weight, components.vae.decoder.conv_out.weight)


def test_training_goes_on_while_the_copy_is_written(components, tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=3)
    before = components.unet.conv_in.weight.detach().clone()
    training_state = state(4)
    final = checkpoints.save(4, components, training_state)  # returns before the folder is written
    with torch.no_grad():  # the next steps change the weights and the optimizer state in place
        components.unet.conv_in.weight.add_(1.0)
        training_state["optimizer"]["moment"].add_(100.0)
    assert checkpoints.wait() == final
    assert torch.equal(load_components(str(final)).unet.conv_in.weight, before)
    assert torch.equal(load_training_state(final, mmap=True)["optimizer"]["moment"], torch.full((3,), 4.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_write_is_reported_and_leaves_no_partial_folder(components, tmp_path, monkeypatch):
    checkpoints = Checkpoints(tmp_path, keep=3)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_full)
        checkpoints.save(6, components, state(6))
        with pytest.raises(OSError, match="No space left"):
            checkpoints.wait()
    assert list(tmp_path.iterdir()) == []
    assert save(checkpoints, 7, components).name == "step_00000007"  # the writer still works afterwards


@pytest.mark.skipif(not TF4_PYTHON.is_file(), reason=f"no transformers-4 virtualenv at {TF4_PYTHON} (see README, "
                    "'Checkpoints in other tools'; or set SDSWARM_TF4_PYTHON)")
def test_a_transformers_4_environment_loads_the_folder_with_the_same_text_encoder(components, tmp_path):
    folder = save(Checkpoints(tmp_path / "checkpoints", keep=1), 3, components)
    encoder = PromptEncoder(components.tokenizer, components.text_encoder)
    with torch.no_grad():
        expected = encoder([PROMPT])
    script = textwrap.dedent(f"""
        import sys, torch, transformers, diffusers
        from diffusers import StableDiffusionPipeline
        assert transformers.__version__.startswith("4."), transformers.__version__
        pipe = StableDiffusionPipeline.from_pretrained({str(folder)!r}, safety_checker=None,
                                                       requires_safety_checker=False)
        ids = pipe.tokenizer({PROMPT!r}, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = pipe.text_encoder(ids).last_hidden_state
        torch.save(hidden, {str(tmp_path / "hidden.pt")!r})
        print(transformers.__version__, diffusers.__version__)
    """)
    result = subprocess.run([str(TF4_PYTHON), "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "newly initialized" not in result.stderr and "were not used" not in result.stderr, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "hidden.pt"), expected, rtol=1e-5, atol=1e-5)
