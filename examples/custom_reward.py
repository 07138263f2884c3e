"""A reward of your own, named by import path in a config (no registration):

    reward:
      terms:
        - name: custom_reward:RedShare      # module:attr, importable on the driver and the reward nodes
          kwargs: {min_red: 160}

loop-ray calls `RedShare(**kwargs)` once per reward actor and then `reward(images, prompts)` with
uint8 images [B, H, W, 3] and B prompts; it returns B finite numbers. Make the module importable
(installed, on PYTHONPATH, e.g. `PYTHONPATH=examples`, or shipped with the term's `runtime_env`,
see docs/rewards.md).
"""

from __future__ import annotations

import numpy as np


class RedShare:
    """The share of pixels whose red channel is at least `min_red` and above both other channels."""

    def __init__(self, min_red: int = 160):
        if not 0 <= min_red <= 255:
            raise ValueError(f"min_red must be in [0, 255], got {min_red}")
        self.min_red = min_red

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        rgb = images.astype(np.int16)
        red = (rgb[..., 0] >= self.min_red) & (rgb[..., 0] > rgb[..., 1]) & (rgb[..., 0] > rgb[..., 2])
        return red.mean(axis=(1, 2)).astype(np.float32)
