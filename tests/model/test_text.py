"""Prompt tokenization/encoding with 77-token chunks, checked against hand-built token sequences."""

import random

import pytest
import torch
from transformers import CLIPTokenizer

from sdswarm.model.text import PromptEncoder, drop_captions

CAPTIONS = ["a photo of a cat", "", "the cat, the hat. " * 30]  # the last is far longer than 75 tokens


def plain_ids(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True).input_ids


def test_single_chunk_equals_plain_tokenizer(tokenizer, text_encoder):
    ids = PromptEncoder(tokenizer, text_encoder).tokenize(CAPTIONS)
    assert ids.dtype == torch.long and ids.shape == (3, 77)
    assert ids.tolist() == plain_ids(tokenizer, CAPTIONS)


def test_single_chunk_equals_plain_tokenizer_when_pad_is_not_eos(clip_assets, text_encoder):
    # SD 2.x style tokenizer pads with "!" instead of <|endoftext|>: EOS must still follow the content.
    tok = CLIPTokenizer(*clip_assets, model_max_length=77, pad_token="!")
    assert tok.pad_token_id != tok.eos_token_id
    assert PromptEncoder(tok, text_encoder).tokenize(CAPTIONS).tolist() == plain_ids(tok, CAPTIONS)


def test_chunked_ids_by_hand(tokenizer, text_encoder):
    a = tokenizer.convert_tokens_to_ids("a</w>")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    short = tokenizer("a a", add_special_tokens=False).input_ids
    assert short == [a, a]
    enc = PromptEncoder(tokenizer, text_encoder, extended_chunks=3)
    # 100 tokens -> 2 chunks: 75 + 25 (the rest padded). The batch is padded to 2 chunks.
    ids = enc.tokenize(["a " * 100, "a a"])
    assert ids.shape == (2, 154)
    assert ids[0].tolist() == [bos] + [a] * 75 + [eos] + [bos] + [a] * 25 + [pad] * 50 + [eos]
    assert ids[1].tolist() == [bos, a, a] + [pad] * 73 + [eos] + [bos] + [pad] * 75 + [eos]
    # 300 tokens with at most 3 chunks: truncated to 225, three full chunks.
    ids = enc.tokenize(["a " * 300])
    assert ids.tolist() == [([bos] + [a] * 75 + [eos]) * 3]
    # Exactly 75 tokens still fits one chunk.
    assert enc.tokenize(["a " * 75]).shape == (1, 77)
    assert enc.tokenize(["a " * 76]).shape == (1, 154)


def test_embedding_shape_and_chunks_encoded_separately(tokenizer, text_encoder):
    enc = PromptEncoder(tokenizer, text_encoder, extended_chunks=3)
    captions = ["a the " * 100, "the hat"]  # 200 single-token words -> 3 chunks (75, 75, 50)
    with torch.no_grad():
        emb = enc(captions)
    assert emb.shape == (2, 3 * 77, 32)
    raw = tokenizer(captions[0], add_special_tokens=False, truncation=True, max_length=1000).input_ids
    assert len(raw) == 200
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    for j in range(3):
        part = raw[75 * j : 75 * (j + 1)]
        chunk = torch.tensor([[bos, *part, eos] + [pad] * (75 - len(part))])
        with torch.no_grad():
            alone = text_encoder(input_ids=chunk).last_hidden_state[0]
        torch.testing.assert_close(emb[0, 77 * j : 77 * (j + 1)], alone)
    # Chunk 0 is exactly what the usual truncating pipeline encodes.
    with torch.no_grad():
        usual = text_encoder(input_ids=torch.tensor(plain_ids(tokenizer, captions))).last_hidden_state
    torch.testing.assert_close(emb[:, :77], usual)
    # Chunks differ: chunk 1 starts mid-caption ("the a ..."), and the short caption's later chunks are
    # BOS + padding only.
    assert not torch.allclose(emb[0, :77], emb[0, 77:154])
    assert not torch.allclose(emb[1, :77], emb[1, 77:154])


def test_penultimate(tokenizer, text_encoder, text_encoder_factory):
    captions = ["a photo of a cat", "the hat " * 50]
    last = PromptEncoder(tokenizer, text_encoder, extended_chunks=2)
    pen = PromptEncoder(tokenizer, text_encoder, extended_chunks=2, clip_penultimate=True)
    with torch.no_grad():
        e_last, e_pen = last(captions), pen(captions)
        ids = pen.tokenize(captions).reshape(-1, 77)
        out = text_encoder(input_ids=ids, output_hidden_states=True)
        ref = text_encoder.final_layer_norm(out.hidden_states[-2]).reshape(2, 154, 32)
        # Independent reference: a 1-layer copy with the same weights ends (after its final norm) exactly
        # where the 2-layer model's penultimate layer ends.
        one = text_encoder_factory(num_layers=1)
        missing, _ = one.load_state_dict(text_encoder.state_dict(), strict=False)
        assert not missing
        ref_one = one(input_ids=ids).last_hidden_state.reshape(2, 154, 32)
    assert e_pen.shape == e_last.shape == (2, 154, 32)
    torch.testing.assert_close(e_pen, ref)
    torch.testing.assert_close(e_pen, ref_one)
    assert (e_pen - e_last).abs().max() > 1e-3


def test_gradients_reach_text_encoder(tokenizer, text_encoder):
    enc = PromptEncoder(tokenizer, text_encoder, extended_chunks=2, clip_penultimate=True)
    enc(["a photo of a cat " * 30]).square().sum().backward()
    grad = text_encoder.embeddings.token_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_encode_rejects_bad_shape(tokenizer, text_encoder):
    with pytest.raises(ValueError):
        PromptEncoder(tokenizer, text_encoder).encode(torch.zeros(1, 80, dtype=torch.long))


def test_drop_captions_rate():
    n, ucg = 20000, 0.3
    captions = [f"caption {i}" for i in range(n)]
    out = drop_captions(captions, ucg, random.Random(0))
    dropped = sum(c == "" for c in out)
    sigma = (n * ucg * (1 - ucg)) ** 0.5  # binomial std = 64.8
    assert abs(dropped - n * ucg) <= 4 * sigma
    assert all(o in ("", c) for o, c in zip(out, captions, strict=True))
    assert out == drop_captions(captions, ucg, random.Random(0))  # same seed, same drops


def test_drop_captions_extremes():
    captions = ["x"] * 1000
    assert drop_captions(captions, 0.0, random.Random(1)) == captions
    assert drop_captions(captions, 1.0, random.Random(1)) == [""] * 1000
    with pytest.raises(ValueError):
        drop_captions(captions, 1.5, random.Random(1))
