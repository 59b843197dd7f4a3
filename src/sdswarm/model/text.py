"""Prompt encoding for SD 1.x CLIP text encoders, with optional long prompts split into 77-token chunks."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

CHUNK_LEN = 77  # CLIP context length: BOS + 75 tokens + EOS
CONTENT_LEN = CHUNK_LEN - 2


class PromptEncoder:
    """Tokenizes captions into k chunks of 77 tokens (k <= extended_chunks) and encodes each chunk
    separately, so prompts longer than 75 tokens are not silently cut at 75. SD conditions on the full
    hidden-state sequence; the pooled/EOS output is not used."""

    def __init__(self, tokenizer, text_encoder, extended_chunks: int = 1, clip_penultimate: bool = False):
        if extended_chunks < 1:
            raise ValueError(f"extended_chunks must be >= 1, got {extended_chunks}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"tokenizer has no {name}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.extended_chunks = extended_chunks
        self.clip_penultimate = clip_penultimate

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """(batch, k*77) ids; k = chunks the longest caption needs (1..extended_chunks). Each chunk is
        BOS + its (up to 75) tokens + EOS + pad tokens, which for the SD 1.x tokenizer (pad == EOS) is the
        same as BOS + 75-token padded slice + EOS, and for k == 1 equals the tokenizer's own max_length=77
        padding."""
        tok = self.tokenizer
        max_tokens = self.extended_chunks * CONTENT_LEN
        # An explicit max_length also stops the tokenizer warning about sequences longer than 77.
        ids = tok(list(captions), add_special_tokens=False, truncation=True, max_length=max_tokens).input_ids
        k = max([1] + [-(-len(x) // CONTENT_LEN) for x in ids])
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        rows = []
        for x in ids:
            row: list[int] = []
            for j in range(k):
                part = x[j * CONTENT_LEN : (j + 1) * CONTENT_LEN]
                # EOS right after the content (as the tokenizer does), so pad != EOS tokenizers are right too.
                row += [bos, *part, eos] + [pad] * (CONTENT_LEN - len(part))
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), k * CHUNK_LEN)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, k*77) ids -> (batch, k*77, hidden); each chunk encoded on its own, chunks concatenated."""
        if input_ids.ndim != 2 or input_ids.shape[1] % CHUNK_LEN:
            raise ValueError(f"input_ids must be (batch, k*{CHUNK_LEN}), got {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        chunks = input_ids.reshape(batch * (length // CHUNK_LEN), CHUNK_LEN)
        if self.clip_penultimate:
            out = self.text_encoder(input_ids=chunks, output_hidden_states=True)
            # transformers < 5 nests the layers under .text_model; 5.x has final_layer_norm on the model.
            text_model = getattr(self.text_encoder, "text_model", self.text_encoder)
            hidden = text_model.final_layer_norm(out.hidden_states[-2])
        else:
            hidden = self.text_encoder(input_ids=chunks).last_hidden_state
        return hidden.reshape(batch, length, hidden.shape[-1])

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        return self.encode(self.tokenize(captions).to(self.device))


def drop_captions(captions: Sequence[str], ucg: float, generator: random.Random) -> list[str]:
    """Caption dropout: each caption independently becomes "" with probability `ucg` (the same empty prompt
    classifier-free guidance uses as the unconditional input at inference)."""
    if not 0.0 <= ucg <= 1.0:
        raise ValueError(f"ucg must be in [0, 1], got {ucg}")
    # random() is in [0, 1): ucg == 0 never drops, ucg == 1 always does.
    return ["" if generator.random() < ucg else c for c in captions]
