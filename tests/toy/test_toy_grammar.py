"""The toy prompt grammar: parsing, categories and the pretrain/train/val splits."""

import pytest

from loop_ray.prompts import load_prompts
from loop_ray.toy.grammar import (
    CATEGORIES,
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    SceneObject,
    all_prompts,
    category,
    format_prompt,
    outside_grammar,
    parse,
    prompt_split,
)


def test_grammar_size_and_round_trip():
    assert len(COLOURS) >= 6 and len(SHAPES) == 3
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts))
    for prompt in prompts:
        assert format_prompt(parse(prompt)) == prompt


def test_parse_examples():
    assert parse("a red circle") == [SceneObject("red", "circle")]
    assert parse("a red circle and a blue square") == [SceneObject("red", "circle"), SceneObject("blue", "square")]
    assert parse("a red circle on the right and a blue square on the left") == [
        SceneObject("red", "circle", "right"),
        SceneObject("blue", "square", "left"),
    ]


@pytest.mark.parametrize(
    "bad, word",
    [
        ("a purple circle", "purple"),
        ("a red hexagon", "hexagon"),
        ("a red circle and a red square", "different colours"),
        ("a red circle on the left and a blue square", "positions"),
        ("a red circle on the left and a blue square on the left", "positions"),
        ("red circle", "expected"),
    ],
)
def test_parse_errors_name_the_problem(bad, word):
    with pytest.raises(ValueError, match=word):
        parse(bad)


def test_categories():
    assert category("a red circle") == "one_object"
    assert category("a red circle and a blue triangle") == "two_object"
    assert category("a red circle on the left and a blue triangle on the right") == "two_object_position"
    assert category("a red circle and a blue square") == "novel_pair"  # blue square is held out
    colour, shape = min(HELD_OUT_PAIRS)
    assert category(f"a {colour} {shape}") == "novel_pair"


def _pairs(prompt):
    return {(o.colour, o.shape) for o in parse(prompt)}


def test_splits_are_deterministic_disjoint_and_hold_out_pairs():
    pre, train, val = (prompt_split(n) for n in ("pretrain", "train", "val"))
    assert prompt_split("val") == val
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert {c for _, c in val} == set(CATEGORIES)
    assert {c for _, c in train} == set(CATEGORIES)
    assert all(not (_pairs(p) & HELD_OUT_PAIRS) for p, _ in pre)
    assert all(c == category(p) for p, c in pre + train + val)
    # every seen colour-shape pair occurs in pre-training, and every colour and shape
    seen = set().union(*(_pairs(p) for p, _ in pre))
    assert seen == {(c, s) for c in COLOURS for s in SHAPES} - HELD_OUT_PAIRS


def test_unknown_split_and_prompt_source():
    with pytest.raises(ValueError, match="unknown toy prompt split 'test'"):
        prompt_split("test")
    val = load_prompts("toy:val")
    assert len(val) == len(prompt_split("val")) and set(val.categories) == set(CATEGORIES)


def test_one_category_of_a_split():
    """toy:<split>:<category> keeps that category's prompts of the split, all of them, nothing else."""
    two = load_prompts("toy:train:two_object")
    expected = [p for p, c in prompt_split("train") if c == "two_object"]
    assert two.prompts == expected and set(two.categories) == {"two_object"} and len(two) > 100
    assert not set(two.prompts) & set(load_prompts("toy:val").prompts)
    with pytest.raises(ValueError, match="unknown toy category 'three_object' in prompt source 'toy:train:three_object'"):
        load_prompts("toy:train:three_object")


@pytest.mark.parametrize("prompt, reason", [
    ("a purple hexagon", "unknown words 'purple', 'hexagon'"),
    ("a red circle left of a blue square", "unknown word 'of'"),
    ("a red circle and a red square", "different colours"),
    ("red circle", "expected 'a COLOUR SHAPE [on the SIDE]'"),
])
def test_a_prompt_outside_the_grammar_is_named_with_the_grammar_forms(prompt, reason):
    message = outside_grammar(prompt)
    assert message.startswith(f"toy prompt {prompt!r} is outside the embedded world's grammar (")
    assert reason in message and "\n" not in message
    assert "'a COLOUR SHAPE on the SIDE and a COLOUR SHAPE on the SIDE'" in message and "SIDE in left, right" in message


def test_every_grammar_prompt_is_inside_it():
    assert all(outside_grammar(p) is None for p in all_prompts())
    assert outside_grammar("A Red Circle") is None  # the tokenizer lowercases
