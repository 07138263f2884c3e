"""`toy_binding`: an attribute-binding reward for toy prompts computed from pixels alone.

For each object the prompt asks for, the image is searched for its colour: every pixel gets the
nearest of the background grey and the six palette colours; the colour's largest 8-connected
region is the object. Per object (all credits in [0, 1]):
  presence  = min(1, area / MIN_AREA)                       area: soft pixel coverage of the region
  shape     = softmax_s(IoU_s / SHAPE_TEMPERATURE)[asked]   IoU_s: soft IoU of the region with shape s
                                                            drawn at its centroid with its area
  position  = sigmoid(+-(cx - W/2) / (POSITION_SCALE W))    for "on the left/right", else 1
  score     = presence * (0.3 + 0.7 shape position)
The image's reward is the mean object score divided by (1 + E), where E sums min(1, area / MIN_AREA)
over extra objects: other regions of an asked colour and regions of colours not asked for, each
counted once it covers at least NOISE_AREA pixels. A blank canvas scores 0; a right-coloured
wrong shape keeps partial credit; swapped colours or shapes between two objects lose the shape
(and position) credit of both.

`toy_object_area` is the easy reward of the embedded world: the
share of the canvas the objects cover, sum over pixels of max over palette colours of the pixel's
soft coverage of that colour, divided by the number of pixels. Every sample agrees on how to raise
it (draw bigger objects), so it proves the learning machinery apart from binding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loop_ray.rewards import as_uint8_images, register
from loop_ray.toy.grammar import COLOURS, SHAPES, parse
from loop_ray.toy.render import BACKGROUND, SQUARE_HALF_SIDE, TRIANGLE_CIRCUMRADIUS, shape_coverage

PALETTE = np.asarray([BACKGROUND, *COLOURS.values()], dtype=np.float32)  # label 0 = background
COLOUR_LABEL = {name: i + 1 for i, name in enumerate(COLOURS)}
MIN_AREA = 20.0  # pixels at 32x32 for full presence credit (the smallest rendered object covers ~40)
NOISE_AREA = 4.0  # pixels at 32x32 below which a region is noise, not an object
SHAPE_TEMPERATURE = 0.04
POSITION_SCALE = 0.05
# area of each shape for size r, divided by r^2 (see loop_ray.toy.render)
AREA_PER_R2 = {
    "circle": np.pi,
    "square": (2 * SQUARE_HALF_SIDE) ** 2,
    "triangle": 3 * np.sqrt(3) / 4 * TRIANGLE_CIRCUMRADIUS**2,
}


def pixel_labels(image: np.ndarray) -> np.ndarray:
    """int [H, W]: 0 where the nearest palette entry is the background, else 1 + the colour's index."""
    diff = image.astype(np.float32)[:, :, None, :] - PALETTE[None, None]
    return np.argmin((diff * diff).sum(-1), axis=-1)


def colour_coverage(image: np.ndarray, colour: str) -> np.ndarray:
    """float [H, W]: position of each pixel on the segment background -> colour, clipped to [0, 1]."""
    g = PALETTE[0]
    c = np.asarray(COLOURS[colour], dtype=np.float32)
    return np.clip(((image.astype(np.float32) - g) @ (c - g)) / float((c - g) @ (c - g)), 0.0, 1.0)


def region_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected regions of a boolean mask: (int [H, W] labels 0..n-1, -1 outside the mask; n)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        new = np.where(mask, np.minimum.reduce(neighbours), big)
        if np.array_equal(new, labels):
            break
        labels = new
    ids, compact = np.unique(labels[mask], return_inverse=True)
    out = np.full((h, w), -1)
    out[mask] = compact
    return out, len(ids)


def regions_by_area(mask: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, areas): 8-connected regions of `mask` relabelled 0..n-1 by decreasing summed
    `weights` (label -1 outside the mask), and those sums."""
    labels, n = region_labels(mask)
    if n == 0:
        return labels, np.zeros(0)
    areas = np.bincount(labels[mask], weights=weights[mask], minlength=n)
    order = np.argsort(-areas, kind="stable")
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(n)
    return np.where(mask, rank[np.maximum(labels, 0)], -1), areas[order]


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_or.reduce([padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def shape_ious(soft: np.ndarray) -> dict[str, float]:
    """Soft IoU of a soft object mask with each shape drawn at the mask's centroid with its area."""
    size = soft.shape[0]
    area = float(soft.sum())
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    cx, cy = float((soft * xs).sum() / area), float((soft * ys).sum() / area)
    out = {}
    for shape in SHAPES:
        template = shape_coverage(shape, cx, cy, np.sqrt(area / AREA_PER_R2[shape]), size)
        out[shape] = float(np.minimum(soft, template).sum() / np.maximum(soft, template).sum())
    return out


def _softmax_credit(ious: dict[str, float], asked: str) -> float:
    logits = np.asarray([ious[s] for s in SHAPES]) / SHAPE_TEMPERATURE
    p = np.exp(logits - logits.max())
    return float(p[SHAPES.index(asked)] / p.sum())


def _extra(areas: np.ndarray, px: float) -> float:
    """Extra-object count of regions with these areas: min(1, area / MIN_AREA) above NOISE_AREA."""
    areas = areas[areas >= NOISE_AREA * px]
    return float(np.minimum(1.0, areas / (MIN_AREA * px)).sum())


def score_image(image: np.ndarray, prompt: str) -> tuple[float, list[dict]]:
    """The reward of one uint8 [H, W, 3] image for a toy prompt, with each object's credits."""
    objects = parse(prompt)
    size = image.shape[0]
    px = (size / 32.0) ** 2
    labels = pixel_labels(image)
    asked = {o.colour for o in objects}
    extra = 0.0
    details = []
    for obj in objects:
        coverage = colour_coverage(image, obj.colour)
        regions, areas = regions_by_area(labels == COLOUR_LABEL[obj.colour], coverage)
        extra += _extra(areas[1:], px)
        if len(areas) == 0 or areas[0] < NOISE_AREA * px:
            details.append({"colour": obj.colour, "presence": 0.0, "shape": 0.0, "position": 0.0, "score": 0.0})
            continue
        allowed = (labels == COLOUR_LABEL[obj.colour]) | (labels == 0)
        soft = np.where(_dilate(regions == 0) & allowed, coverage, 0.0)
        presence = min(1.0, areas[0] / (MIN_AREA * px))
        shape = _softmax_credit(shape_ious(soft), obj.shape)
        position = 1.0
        if obj.position is not None:
            cx = float((soft * (np.arange(size) + 0.5)[None, :]).sum() / soft.sum())
            sign = 1.0 if obj.position == "right" else -1.0
            position = float(1.0 / (1.0 + np.exp(-sign * (cx - size / 2) / (POSITION_SCALE * size))))
        score = presence * (0.3 + 0.7 * shape * position)
        details.append({"colour": obj.colour, "presence": presence, "shape": shape, "position": position, "score": score})
    for name in COLOURS:
        if name not in asked:
            mask = labels == COLOUR_LABEL[name]
            if mask.any():
                extra += _extra(regions_by_area(mask, colour_coverage(image, name))[1], px)
    total = float(np.mean([d["score"] for d in details])) / (1.0 + extra)
    return total, details


def binding_reward(images, prompts: Sequence[str]) -> np.ndarray:
    """float32 [B] in [0, 1]: the binding reward of images[i] (uint8 [B, H, W, 3]) for prompts[i]."""
    images = as_uint8_images(images)
    if len(prompts) != len(images):
        raise ValueError(f"toy_binding: {len(images)} images but {len(prompts)} prompts")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"toy_binding: images must be square, got {images.shape[1]}x{images.shape[2]}")
    return np.asarray([score_image(img, p)[0] for img, p in zip(images, prompts)], dtype=np.float32)


@register("toy_binding")
def build_toy_binding(**kwargs):
    """The `toy_binding` reward (no options)."""
    if kwargs:
        raise TypeError(f"reward toy_binding takes no options, got {sorted(kwargs)}")
    return binding_reward


def object_area_reward(images, prompts: Sequence[str]) -> np.ndarray:
    """float32 [B] in [0, 1]: the share of each image's pixels covered by object colours, soft: the
    mean over pixels of max_colour colour_coverage (0 on the background grey, 1 on a palette colour)."""
    images = as_uint8_images(images)
    if len(prompts) != len(images):
        raise ValueError(f"toy_object_area: {len(images)} images but {len(prompts)} prompts")
    out = np.empty(len(images), dtype=np.float32)
    for i, image in enumerate(images):
        cover = np.max(np.stack([colour_coverage(image, c) for c in COLOURS]), axis=0)
        out[i] = float(cover.mean())
    return out


@register("toy_object_area")
def build_toy_object_area(**kwargs):
    """The `toy_object_area` reward (no options): the easy, prompt-independent reward of the embedded world."""
    if kwargs:
        raise TypeError(f"reward toy_object_area takes no options, got {sorted(kwargs)}")
    return object_area_reward
