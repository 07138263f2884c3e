"""The toy renderer: determinism, layout, anti-aliasing, non-overlap."""

import numpy as np
import pytest

from loop_ray.toy.grammar import COLOURS, SceneObject, all_prompts
from loop_ray.toy.render import BACKGROUND, _layout, render, render_batch, shape_coverage


def test_render_shape_dtype_determinism():
    a = render("a red circle and a blue square", seed=3)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render("a red circle and a blue square", seed=3))
    assert not np.array_equal(a, render("a red circle and a blue square", seed=4))
    assert render("a red circle", seed=0, size=48).shape == (48, 48, 3)


def test_colours_present_and_anti_aliased():
    img = render("a yellow triangle and a cyan circle", seed=1).astype(int)
    for name in ("yellow", "cyan"):
        assert (np.abs(img - COLOURS[name]).sum(-1) == 0).sum() > 20
    assert (np.abs(img - BACKGROUND).sum(-1) == 0).sum() > 500
    pure = np.zeros(img.shape[:2], bool)
    for colour in [BACKGROUND, *COLOURS.values()]:
        pure |= np.abs(img - colour).sum(-1) == 0
    assert (~pure).sum() > 10  # edge pixels blend object and background


def test_coverage_areas_match_geometry():
    circle = shape_coverage("circle", 16, 16, 6.0, 32)
    assert circle.sum() == pytest.approx(np.pi * 36, rel=0.02)
    square = shape_coverage("square", 16.3, 15.8, 6.0, 32)
    assert square.sum() == pytest.approx((2 * 0.85 * 6) ** 2, rel=0.05)
    triangle = shape_coverage("triangle", 16.3, 15.8, 6.0, 32)
    assert triangle.sum() == pytest.approx(3 * np.sqrt(3) / 4 * (1.25 * 6) ** 2, rel=0.05)
    with pytest.raises(ValueError, match="hexagon"):
        shape_coverage("hexagon", 16, 16, 6.0, 32)


def test_positions_and_no_overlap():
    rng = np.random.default_rng(0)
    prompts = [p for p in all_prompts() if " and " in p]
    for prompt in rng.choice(prompts, 60, replace=False):
        from loop_ray.toy.grammar import parse

        objects = parse(prompt)
        for seed in range(3):
            placed = _layout(objects, np.random.default_rng(seed), 32)
            masks = [shape_coverage(o.shape, cx, cy, r, 32) > 0 for o, (cx, cy, r) in zip(objects, placed)]
            assert not (masks[0] & masks[1]).any(), prompt
            for obj, (cx, _, _) in zip(objects, placed):
                if obj.position == "left":
                    assert cx < 16
                if obj.position == "right":
                    assert cx > 16


def test_one_object_is_centred_and_batch_matches():
    cx, cy, r = _layout([SceneObject("red", "circle")], np.random.default_rng(5), 32)[0]
    assert abs(cx - 16) <= 2.5 and abs(cy - 16) <= 2.5 and 6 <= r <= 8
    batch = render_batch(["a red circle", "a blue square"], [1, 2])
    assert np.array_equal(batch[1], render("a blue square", 2))
    with pytest.raises(ValueError):
        render_batch(["a red circle"], [1, 2])
