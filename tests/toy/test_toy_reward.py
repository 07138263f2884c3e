"""The toy binding reward computed from pixels."""

import numpy as np
import pytest

from loop_ray.rewards import build_reward
from loop_ray.toy.grammar import SceneObject, parse, prompt_split
from loop_ray.toy.render import render_batch, render_scene
from loop_ray.toy.reward import binding_reward, regions_by_area, score_image


def test_ground_truth_renders_score_high():
    pairs = prompt_split("val") + prompt_split("train")[::8]
    prompts = [p for p, _ in pairs]
    r = binding_reward(render_batch(prompts, list(range(len(prompts)))), prompts)
    assert r.dtype == np.float32 and r.shape == (len(prompts),)
    assert r.mean() >= 0.95 and r.min() > 0.9


SWAP_PROMPTS = [
    "a red circle and a blue square",
    "a green triangle and a yellow circle",
    "a cyan square on the left and a magenta triangle on the right",
    "a yellow circle on the right and a red square on the left",
]


@pytest.mark.parametrize("prompt", SWAP_PROMPTS)
def test_swapped_colours_or_shapes_score_at_most_half(prompt):
    a, b = parse(prompt)
    colour_swap = [SceneObject(b.colour, a.shape, a.position), SceneObject(a.colour, b.shape, b.position)]
    shape_swap = [SceneObject(a.colour, b.shape, a.position), SceneObject(b.colour, a.shape, b.position)]
    for seed in range(3):
        truth = binding_reward(render_scene([a, b], seed)[None], [prompt])[0]
        assert truth >= 0.95
        for objects in (colour_swap, shape_swap):
            assert binding_reward(render_scene(objects, seed)[None], [prompt])[0] <= 0.5


def test_blank_and_wrong_shape():
    blank = np.full((1, 32, 32, 3), 128, np.uint8)
    assert binding_reward(blank, ["a red circle"])[0] == 0.0
    assert binding_reward(blank, ["a red circle on the left and a blue square on the right"])[0] == 0.0
    for shape in ("square", "triangle"):
        r = binding_reward(render_scene([SceneObject("red", shape)], 0)[None], ["a red circle"])[0]
        assert 0.0 < r < 0.6


def test_partial_credit_is_graded():
    prompt = "a red circle and a blue square"
    full = render_scene(parse(prompt), 0)
    one_missing = render_scene([SceneObject("red", "circle")], 0)  # the blue square is absent
    tiny = np.full((32, 32, 3), 128, np.uint8)
    tiny[10:13, 10:14] = (255, 0, 0)  # a 12-pixel red patch: partial presence
    r = binding_reward(np.stack([full, one_missing, tiny]), [prompt, prompt, "a red square"])
    assert r[0] > r[1] > 0.0
    assert 0.0 < r[2] < binding_reward(render_scene([SceneObject("red", "square")], 0)[None], ["a red square"])[0]


def test_extra_objects_and_wrong_side_are_penalised():
    one = render_scene([SceneObject("red", "circle")], 0)
    with_extra = render_scene([SceneObject("red", "circle"), SceneObject("blue", "square")], 0)
    r = binding_reward(np.stack([one, with_extra]), ["a red circle", "a red circle"])
    assert r[0] > 0.95 and r[1] < 0.6
    prompt = "a red circle on the left and a blue square on the right"
    a, b = parse(prompt)
    mirrored = render_scene([SceneObject(a.colour, a.shape, "right"), SceneObject(b.colour, b.shape, "left")], 0)
    assert binding_reward(mirrored[None], [prompt])[0] < 0.5
    _, details = score_image(mirrored, prompt)
    assert all(d["shape"] > 0.9 and d["position"] < 0.1 for d in details)


def test_reward_range_on_noise_and_registry():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red circle", "a blue square and a green circle", "a cyan triangle", "a yellow square"]
    r = binding_reward(noise, prompts)
    assert ((r >= 0) & (r <= 1)).all()
    reward = build_reward("toy_binding")
    assert np.allclose(reward(noise, prompts), r)
    with pytest.raises(TypeError, match="no options"):
        build_reward("toy_binding", scale=2)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        binding_reward(noise[:2], prompts[:1])


def test_connected_regions():
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:2] = True
    mask[5:8, 5:8] = True
    mask[2, 2] = True  # diagonal neighbour joins the first region (8-connectivity)
    weights = np.ones((8, 8))
    weights[5:8, 5:8] = 3.0
    labels, areas = regions_by_area(mask, weights)
    assert list(areas) == [27.0, 5.0]  # ordered by summed weight, not pixel count
    assert (labels == 0).sum() == 9 and (labels == 1).sum() == 5 and (labels == -1).sum() == 50
