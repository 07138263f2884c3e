"""Render a toy prompt into an anti-aliased RGB image (the embedded world's ground truth).

Layout (a fixed slot layout with random jitter, which is what made a small model learn shape
words; fully random placement did not): one object sits at the centre, jittered by up to
+-2.5 px (at 32 px) with size r in [6, 8] px; two objects sit in a left slot (x = 0.27 W) and a
right slot (x = 0.73 W), jittered by up to +-1.5 px across and +-2.5 px down, with r in [4.5, 5.5] px,
re-drawn until their bounding discs keep a 1 px gap. A prompt without positions puts its objects
into the slots in random order. Edges are anti-aliased by 4x4 supersampling.

Shape geometry for a size r: a circle of radius r, an axis-aligned square of half-side 0.85 r, an
upward triangle (equilateral) with circumradius 1.25 r; the centre is each shape's centroid.
"""

from __future__ import annotations

import numpy as np

from loop_ray.toy.grammar import COLOURS, SceneObject, parse

BACKGROUND = (128, 128, 128)
SQUARE_HALF_SIDE = 0.85  # x r
TRIANGLE_CIRCUMRADIUS = 1.25  # x r
EXTENT = {"circle": 1.0, "square": SQUARE_HALF_SIDE * np.sqrt(2.0), "triangle": TRIANGLE_CIRCUMRADIUS}
SLOT_X = {"left": 0.27, "right": 0.73}


def shape_coverage(shape: str, cx: float, cy: float, r: float, size: int, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel of a size x size canvas inside the shape, float32 [size, size].

    Pixel (i, j) covers [j, j+1) x [i, i+1); the shape is tested at supersample^2 points per pixel.
    """
    n = size * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / supersample
    x = coords[None, :] - cx
    y = coords[:, None] - cy
    if shape == "circle":
        inside = x * x + y * y <= r * r
    elif shape == "square":
        h = SQUARE_HALF_SIDE * r
        inside = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "triangle":
        big_r = TRIANGLE_CIRCUMRADIUS * r
        # apex up at (0, -R); base at y = R/2; sides through the apex and the base corners (+-R*sqrt3/2, R/2)
        inside = (y <= big_r / 2) & (np.sqrt(3.0) * np.abs(x) - y <= big_r)
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes: circle, square, triangle")
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3)).astype(np.float32)


def _layout(objects: list[SceneObject], rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """(cx, cy, r) in pixels for each object."""
    s = size / 32.0
    if len(objects) == 1:
        cx, cy = size / 2 + rng.uniform(-2.5, 2.5, size=2) * s
        return [(cx, cy, rng.uniform(6.0, 8.0) * s)]
    if objects[0].position is not None:
        sides = [o.position for o in objects]
    else:
        sides = ["left", "right"] if rng.random() < 0.5 else ["right", "left"]
    for _ in range(100):
        placed = []
        for obj, side in zip(objects, sides):
            r = rng.uniform(4.5, 5.5) * s
            ext = EXTENT[obj.shape] * r
            cx = np.clip(SLOT_X[side] * size + rng.uniform(-1.5, 1.5) * s, ext + 0.5, size - ext - 0.5)
            cy = np.clip(size / 2 + rng.uniform(-2.5, 2.5) * s, ext + 0.5, size - ext - 0.5)
            placed.append((float(cx), float(cy), float(r), ext))
        (x1, y1, _, e1), (x2, y2, _, e2) = placed
        if np.hypot(x1 - x2, y1 - y2) >= e1 + e2 + 1.0:
            return [p[:3] for p in placed]
    raise RuntimeError(f"no non-overlapping layout found for {objects} at size {size}")


def render_scene(objects: list[SceneObject], seed: int, size: int = 32) -> np.ndarray:
    """uint8 [size, size, 3] image of the objects on a mid-grey canvas, layout drawn from `seed`."""
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = BACKGROUND
    for obj, (cx, cy, r) in zip(objects, _layout(objects, rng, size)):
        alpha = shape_coverage(obj.shape, cx, cy, r, size)[..., None]
        image = image * (1.0 - alpha) + np.asarray(COLOURS[obj.colour], dtype=np.float32) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(prompt: str, seed: int, size: int = 32) -> np.ndarray:
    """uint8 [size, size, 3] ground-truth image of a toy prompt; the same (prompt, seed) gives the same image."""
    return render_scene(parse(prompt), seed, size)


def render_batch(prompts: list[str], seeds: list[int], size: int = 32) -> np.ndarray:
    """uint8 [B, size, size, 3] renders of prompts[i] with seeds[i]."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    return np.stack([render(p, s, size) for p, s in zip(prompts, seeds)])
