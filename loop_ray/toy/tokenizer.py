"""A word-level tokenizer for the toy grammar, as a transformers fast tokenizer.

One id per grammar word, plus <pad>, <unk>, <bos> and <eos>; a prompt becomes
`<bos> words... <eos> <pad>...` padded to MAX_LENGTH, like CLIP's tokenizer for Stable Diffusion,
so the policy code tokenizes toy and SD prompts with the same call.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from loop_ray.toy.grammar import vocabulary

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
MAX_LENGTH = 16  # the longest prompt has 13 words, 15 tokens with <bos> and <eos>


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer: ids 0-3 are <pad>, <unk>, <bos>, <eos>, then the grammar's words."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=MAX_LENGTH,
        padding_side="right",
    )
    return tokenizer


def tokenize(tokenizer, prompts: list[str]):
    """input_ids long [B, model_max_length] exactly as the policy does it (pad to max length, truncate)."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """Write the tokenizer files (tokenizer.json and its configs) into `folder`."""
    tokenizer.save_pretrained(str(folder))


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """Read a tokenizer written by `save_tokenizer`."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"toy tokenizer not found: {folder / 'tokenizer.json'}")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))
