"""Rewards with a known gradient signal for the diagnostic's tests, plugged in by import path
("signal_rewards:...") the way a user's black-box reward is."""

from __future__ import annotations

import numpy as np


class ChannelMean:
    """A builder (kwargs -> reward): the mean of one colour channel of the image, in [0, 1]. In a
    pixel-space model whose stochastic step is followed by nearly deterministic ones, it is a
    smooth function of that step's noise, so the true policy gradient points one way."""

    def __init__(self, channel: int = 0):
        self.channel = channel

    def __call__(self, images, prompts):
        return np.asarray(images, dtype=np.float32)[..., self.channel].mean(axis=(1, 2)) / 255.0


class IndependentNoise:
    """A builder: a standard normal reward per image, independent of the image (seeded)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def __call__(self, images, prompts):
        return self.rng.standard_normal(len(prompts)).astype(np.float32)
