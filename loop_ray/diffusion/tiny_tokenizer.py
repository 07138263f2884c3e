"""A tiny CLIP tokenizer built in memory (no download), shared by the tiny DDIM and flow stacks."""

from __future__ import annotations

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

# Whole-word tokens of the tiny tokenizer; any other text still tokenizes, byte by byte.
_TINY_WORDS = [
    "a",
    "an",
    "the",
    "and",
    "of",
    "on",
    "in",
    "with",
    "to",
    "left",
    "right",
    "top",
    "bottom",
    "above",
    "below",
    "next",
    "photo",
    "red",
    "green",
    "blue",
    "yellow",
    "cyan",
    "magenta",
    "white",
    "black",
    "circle",
    "square",
    "triangle",
    "cat",
    "dog",
]


def tiny_clip_tokenizer(model_max_length: int = 32) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer built in memory, with no download.

    Vocabulary: the two CLIP specials, the 256 byte-level symbols with and without the end-of-word
    mark `</w>`, and whole-word tokens for `_TINY_WORDS` with the merges that build them. Padding
    and the unknown token are `<|endoftext|>`, as in CLIP. `save_pretrained` writes tokenizer.json.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for symbol in alphabet + [c + "</w>" for c in alphabet]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
            vocab.setdefault(left, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
