"""Misbehaving rewards for the tests, plugged in by import path ("faulty_rewards:...") the way a
user's black-box reward is. conftest.py puts this folder on the Ray workers' PYTHONPATH."""

from __future__ import annotations

import numpy as np


class PromptFaults:
    """A builder (kwargs -> reward): the mean pixel value, but NaN for images of `nan_prompts`
    and +inf for images of `inf_prompts`."""

    def __init__(self, nan_prompts=(), inf_prompts=()):
        self.nan_prompts, self.inf_prompts = set(nan_prompts), set(inf_prompts)

    def __call__(self, images, prompts):
        values = np.asarray(images, dtype=np.float32).mean(axis=(1, 2, 3)) / 255.0
        values[[p in self.nan_prompts for p in prompts]] = np.nan
        values[[p in self.inf_prompts for p in prompts]] = np.inf
        return values


def wrong_shape(images, prompts):
    """The reward itself (images, prompts): one value too many, whatever the batch."""
    return np.zeros(len(prompts) + 1, dtype=np.float32)


def raises(images, prompts):
    raise RuntimeError("reward server unreachable")


NOT_CALLABLE = 3
