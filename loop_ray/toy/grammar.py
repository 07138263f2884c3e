"""The embedded world's prompt grammar: colours x shapes x positions, its parser and its splits.

Three prompt forms, each a category that evaluation reports on its own:
  one_object           "a red circle"
  two_object           "a red circle and a blue square"
  two_object_position  "a red circle on the left and a blue square on the right" (either side first)
The two objects of a prompt always have different colours, so that an object can be found in the
image by its colour alone. Three colour-shape bindings (HELD_OUT_PAIRS) never occur in the
pre-training split; prompts that contain one are put in the category `novel_pair`.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

# RGB-cube corners (no black or white): equidistant from the mid-grey background and from each other
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right")
# colour-shape bindings that pre-training never shows (each colour and each shape at most once)
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})

CATEGORIES: tuple[str, ...] = ("one_object", "two_object", "two_object_position", "novel_pair")
SPLITS: tuple[str, ...] = ("pretrain", "train", "val")
# validation prompts drawn per category; the rest of each category (outside pre-training) is for RL
VAL_COUNTS: dict[str, int] = {"one_object": 6, "two_object": 12, "two_object_position": 12, "novel_pair": 10}
SPLIT_SEED = 20250301


@dataclass(frozen=True)
class SceneObject:
    """One object a prompt asks for; `position` is "left", "right" or None (anywhere)."""

    colour: str
    shape: str
    position: str | None = None


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order."""
    return ["a", "and", "on", "the", *COLOURS, *SHAPES, *POSITIONS]


def format_prompt(objects: list[SceneObject] | tuple[SceneObject, ...]) -> str:
    """The prompt text for one or two objects (positions either on both or on neither)."""
    if len(objects) not in (1, 2):
        raise ValueError(f"a toy prompt has one or two objects, got {len(objects)}")
    parts = []
    for obj in objects:
        text = f"a {obj.colour} {obj.shape}"
        if obj.position is not None:
            text += f" on the {obj.position}"
        parts.append(text)
    return " and ".join(parts)


def _parse_object(words: list[str], prompt: str) -> SceneObject:
    if len(words) not in (3, 6) or words[0] != "a":
        raise ValueError(f"cannot parse {' '.join(words)!r} in toy prompt {prompt!r}: expected 'a COLOUR SHAPE [on the SIDE]'")
    colour, shape = words[1], words[2]
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r} in toy prompt {prompt!r}; colours: {list(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} in toy prompt {prompt!r}; shapes: {list(SHAPES)}")
    position = None
    if len(words) == 6:
        if words[3:5] != ["on", "the"] or words[5] not in POSITIONS:
            raise ValueError(f"cannot parse position {' '.join(words[3:])!r} in toy prompt {prompt!r}")
        position = words[5]
    return SceneObject(colour, shape, position)


def parse(prompt: str) -> list[SceneObject]:
    """The objects a toy prompt asks for, in prompt order; raises ValueError naming the bad word."""
    words = prompt.lower().split()
    if "and" in words:
        cut = words.index("and")
        objects = [_parse_object(words[:cut], prompt), _parse_object(words[cut + 1 :], prompt)]
        a, b = objects
        if a.colour == b.colour:
            raise ValueError(f"toy prompt {prompt!r}: the two objects must have different colours")
        if (a.position is None) != (b.position is None) or (a.position is not None and a.position == b.position):
            raise ValueError(f"toy prompt {prompt!r}: give both objects different positions, or neither")
        return objects
    return [_parse_object(words, prompt)]


FORMS: tuple[str, ...] = (
    "a COLOUR SHAPE",
    "a COLOUR SHAPE and a COLOUR SHAPE",
    "a COLOUR SHAPE on the SIDE and a COLOUR SHAPE on the SIDE",
)


def outside_grammar(prompt: str) -> str | None:
    """None for a prompt of the grammar; otherwise one line saying why it is not (its unknown words,
    which the toy tokenizer reads as <unk>, or the parse error) and the grammar's forms and words.
    The embedded model was never trained on such a prompt, so its images mean little."""
    words = re.findall(r"\w+|[^\w\s]", prompt.lower())  # the toy tokenizer's Whitespace split
    known = set(vocabulary())
    unknown = list(dict.fromkeys(w for w in words if w not in known))
    if unknown:
        reason = ("unknown word " if len(unknown) == 1 else "unknown words ") + ", ".join(repr(w) for w in unknown)
    else:
        try:
            parse(prompt)
            return None
        except ValueError as err:
            reason = str(err)
    return (f"toy prompt {prompt!r} is outside the embedded world's grammar ({reason}); its forms: "
            + "; ".join(repr(f) for f in FORMS)
            + f" with COLOUR in {', '.join(COLOURS)}, SHAPE in {', '.join(SHAPES)}, SIDE in {', '.join(POSITIONS)}")


def category(prompt: str) -> str:
    """The prompt's evaluation category (see the module docstring)."""
    objects = parse(prompt)
    if any((o.colour, o.shape) in HELD_OUT_PAIRS for o in objects):
        return "novel_pair"
    if len(objects) == 1:
        return "one_object"
    return "two_object_position" if objects[0].position else "two_object"


def all_prompts() -> list[str]:
    """Every prompt of the grammar, in a fixed order."""
    singles = [SceneObject(c, s) for c in COLOURS for s in SHAPES]
    prompts = [format_prompt([o]) for o in singles]
    pairs = [(a, b) for a, b in itertools.permutations(singles, 2) if a.colour != b.colour]
    prompts += [format_prompt([a, b]) for a, b in pairs]
    for a, b in pairs:
        for first, second in (("left", "right"), ("right", "left")):
            prompts.append(format_prompt([SceneObject(a.colour, a.shape, first), SceneObject(b.colour, b.shape, second)]))
    return prompts


def prompt_split(name: str) -> list[tuple[str, str]]:
    """(prompt, category) pairs of a split: "pretrain", "train" (RL) or "val" (held out).

    pretrain: every prompt without a held-out binding. val: VAL_COUNTS prompts per category, drawn
    with a fixed seed. train: every other prompt (novel bindings included), disjoint from val.
    """
    if name not in SPLITS:
        raise ValueError(f"unknown toy prompt split {name!r}; splits: {list(SPLITS)}")
    by_category: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for prompt in all_prompts():
        by_category[category(prompt)].append(prompt)
    rng = random.Random(SPLIT_SEED)
    val = {c: set(rng.sample(ps, VAL_COUNTS[c])) for c, ps in by_category.items()}
    out = []
    for cat, prompts in by_category.items():
        for prompt in prompts:
            if name == "pretrain":
                keep = cat != "novel_pair"
            elif name == "val":
                keep = prompt in val[cat]
            else:
                keep = prompt not in val[cat]
            if keep:
                out.append((prompt, cat))
    return out
