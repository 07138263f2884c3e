"""The word-level toy tokenizer."""

import torch

from loop_ray.toy.grammar import all_prompts, vocabulary
from loop_ray.toy.tokenizer import MAX_LENGTH, build_tokenizer, load_tokenizer, save_tokenizer, tokenize


def test_round_trip_every_prompt():
    tok = build_tokenizer()
    prompts = all_prompts()
    ids = tokenize(tok, prompts)
    assert ids.shape == (len(prompts), MAX_LENGTH) and ids.dtype == torch.long
    assert tok.batch_decode(ids, skip_special_tokens=True) == prompts
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert len(tok) == 4 + len(vocabulary())


def test_layout_empty_prompt_and_unknown_word():
    tok = build_tokenizer()
    ids = tokenize(tok, ["", "A Red circle", "a red dodecahedron"])
    assert ids[0, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]
    assert (ids[0, 2:] == tok.pad_token_id).all()
    assert ids[1].tolist() == tokenize(tok, ["a red circle"])[0].tolist()  # lower-cased
    assert ids[2, 3].item() == tok.unk_token_id


def test_save_load_identical(tmp_path):
    tok = build_tokenizer()
    save_tokenizer(tok, tmp_path)
    loaded = load_tokenizer(tmp_path)
    prompts = ["a red circle on the left and a blue square on the right", ""]
    assert torch.equal(tokenize(loaded, prompts), tokenize(tok, prompts))
    assert loaded.model_max_length == MAX_LENGTH
