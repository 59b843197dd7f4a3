"""Tiny CLIP tokenizer + text encoder with random weights (no downloads)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import sdswarm.model

SHIPPED = Path(sdswarm.model.__file__).parent / "tiny_tokenizer"


def _bytes_to_unicode() -> list[str]:
    # GPT-2/CLIP byte -> printable character table, so the fallback vocab has the same format as the real one.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _write_fallback_assets(folder: Path) -> None:
    chars = _bytes_to_unicode()
    merges = ["t h", "th e</w>", "c a", "ca t</w>", "p h", "o t", "ot o</w>", "ph oto</w>"]
    vocab = [*chars, *(c + "</w>" for c in chars)]
    vocab += ["".join(m.split()) for m in merges]  # each merge's result is a token
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


@pytest.fixture(scope="session")
def clip_assets(tmp_path_factory) -> tuple[str, str]:
    """(vocab.json, merges.txt): the shipped tiny CLIP BPE if present, else a byte-level one built here."""
    folder = SHIPPED
    if not ((folder / "vocab.json").exists() and (folder / "merges.txt").exists()):
        folder = tmp_path_factory.mktemp("clip_tokenizer")
        _write_fallback_assets(folder)
    return str(folder / "vocab.json"), str(folder / "merges.txt")


@pytest.fixture(scope="session")
def tokenizer(clip_assets) -> CLIPTokenizer:
    tok = CLIPTokenizer(*clip_assets, model_max_length=77)
    assert tok.pad_token_id == tok.eos_token_id  # SD 1.x convention: pad with <|endoftext|>
    return tok


def make_text_encoder(tokenizer, num_layers: int = 2, seed: int = 0) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


@pytest.fixture
def text_encoder(tokenizer) -> CLIPTextModel:
    return make_text_encoder(tokenizer)


@pytest.fixture
def text_encoder_factory(tokenizer):
    return lambda **kw: make_text_encoder(tokenizer, **kw)
