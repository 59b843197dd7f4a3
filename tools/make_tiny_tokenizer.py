"""Build the tiny CLIP BPE tokenizer embedded in sdswarm (src/sdswarm/model/tiny_tokenizer/).

The vocab is the real CLIP one (OpenAI's bpe_simple_vocab_16e6.txt.gz, shipped in the open_clip_torch wheel),
truncated to the first merges so the tokenizer stays small but still does real BPE:

    pip download --no-deps open_clip_torch -d /tmp/oc
    unzip /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python tools/make_tiny_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "sdswarm" / "model" / "tiny_tokenizer"
SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


def bytes_to_unicode() -> dict[int, str]:
    """Same byte -> printable unicode table (and order) as CLIP's simple_tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build(bpe_gz: Path, vocab_size: int) -> tuple[dict[str, int], list[str]]:
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a header; CLIP uses lines 1..48894 (49152 - 256 - 2 merges).
    merges = lines[1 : 49152 - 256 - 2 + 1]
    n_merges = vocab_size - 2 * 256 - len(SPECIAL_TOKENS)
    if not 0 <= n_merges <= len(merges):
        raise ValueError(f"vocab_size must be in [514, {len(merges) + 514}], got {vocab_size}")
    merges = merges[:n_merges]
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += SPECIAL_TOKENS
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != vocab_size:  # duplicate joined merges would leave holes in the ids
        raise ValueError(f"vocab has {len(vocab)} unique tokens, expected {vocab_size}")
    return vocab, merges


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    vocab, merges = build(args.bpe_gz, args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (args.out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens, {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
