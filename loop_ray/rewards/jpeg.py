"""JPEG (in)compressibility rewards, as defined in DDPO (Black et al., 2023, "Training Diffusion
Models with Reinforcement Learning", section 5.1).

Each image is encoded as a JPEG at quality 95 with Pillow and its file size measured in kilobytes
(bytes / 1000):

    r_incompressibility(x) = size_kB(JPEG_95(x))
    r_compressibility(x)   = -size_kB(JPEG_95(x))

No model is loaded; the prompt is ignored.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from loop_ray.rewards import as_uint8_images, register

JPEG_QUALITY = 95


def jpeg_size_kb(images, quality: int = JPEG_QUALITY) -> np.ndarray:
    """float32 [B]: size in kB (1 kB = 1000 bytes) of each uint8 [H, W, 3] image saved as a JPEG."""
    images = as_uint8_images(images)
    sizes = np.empty(len(images), dtype=np.float32)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes[i] = buffer.tell() / 1000.0
    return sizes


class JpegSize:
    """Reward = sign * JPEG size in kB (sign -1: compressibility, +1: incompressibility)."""

    def __init__(self, sign: float, quality: int = JPEG_QUALITY):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"jpeg reward: quality={quality} must be in [1, 100]")
        self.sign = float(sign)
        self.quality = int(quality)

    def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
        return (self.sign * jpeg_size_kb(images, self.quality)).astype(np.float32)


@register("jpeg_compressibility")
def build_jpeg_compressibility(quality: int = JPEG_QUALITY) -> JpegSize:
    """DDPO's compressibility reward: minus the JPEG (quality 95) size in kB."""
    return JpegSize(-1.0, quality)


@register("jpeg_incompressibility")
def build_jpeg_incompressibility(quality: int = JPEG_QUALITY) -> JpegSize:
    """DDPO's incompressibility reward: the JPEG (quality 95) size in kB."""
    return JpegSize(1.0, quality)
