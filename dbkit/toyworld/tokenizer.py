"""A CLIP-compatible BPE tokenizer for the toy world, written as vocab.json + merges.txt.

Every word of the world is one token; single letters (with and without the end-of-word
mark) are in the vocabulary too, so any other word still tokenizes, as in real CLIP.
A few rare identifiers ("sks", "zwx", "ohwx") are whole tokens that never occur in
pretraining, so their embeddings carry no meaning: the situation DreamBooth's rare-token
identifier relies on in Stable Diffusion.

We build the files ourselves because no CLIP tokenizer can be downloaded here and the
real one's 49k-token vocabulary would dwarf the toy text encoder.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from . import scenes

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 32

RARE_IDENTIFIERS = ("sks", "zwx", "ohwx", "xjy")
# Words used by DreamBooth prompts and the trigger-word experiments; "object" and "toy"
# are aliases the class could be called by, "ace" is a real word with no meaning here.
EXTRA_WORDS = ("photo", "of", "object", "toy", "shape", "ace", "with", "picture", "an", "image")


def world_words() -> list[str]:
    words: list[str] = ["a", "on", "the", "in", "and", "background", ","]
    words += list(scenes.SHAPES) + list(scenes.OBJECT_COLOURS) + list(scenes.BACKGROUNDS)
    words += list(scenes.PATTERNS) + list(scenes.SIZES) + list(scenes.POSITIONS)
    words += list(EXTRA_WORDS) + list(RARE_IDENTIFIERS)
    seen: dict[str, None] = {}
    for w in words:
        for part in w.split():
            seen.setdefault(part, None)
    return list(seen)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one word the way CLIP does (lowest rank first)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges such that every world word is a single token.

    Merges are appended word by word; a merge added later has a higher rank, so it only
    fires where no earlier merge applies and cannot split a word built before it.
    """
    chars = list(string.ascii_lowercase + string.digits + ",.!?'-<>")
    tokens: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in world_words():
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            parts = _bpe(word, ranks)
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def save_tokenizer(path: Path) -> None:
    """Write a tokenizer folder that `CLIPTokenizer.from_pretrained(path)` loads offline."""
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (path / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
