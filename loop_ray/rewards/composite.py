"""The configured reward: a weighted sum of registered rewards, each built once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loop_ray.rewards import as_uint8_images, build_reward


class CompositeReward:
    """r(x_0, c) = sum_n w_n r_n(x_0, c) over the configured reward terms.

    `score` also returns each term's raw values so they can be logged.
    """

    def __init__(self, terms: Sequence[tuple[str, float, dict]]):
        if not terms:
            raise ValueError("reward.terms: at least one reward term is needed")
        self.names = [name for name, _, _ in terms]
        self.weights = np.asarray([w for _, w, _ in terms], dtype=np.float32)
        self.rewards = [build_reward(name, **kwargs) for name, _, kwargs in terms]

    @classmethod
    def from_config(cls, reward_cfg) -> CompositeReward:
        return cls([(t.name, t.weight, dict(t.kwargs)) for t in reward_cfg.terms])

    def score(self, images, prompts: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        images = as_uint8_images(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        parts = {}
        total = np.zeros(len(images), dtype=np.float32)
        for name, w, reward in zip(self.names, self.weights, self.rewards):
            values = np.asarray(reward(images, list(prompts)), dtype=np.float32)
            if values.shape != (len(images),):
                raise ValueError(f"reward {name!r} returned shape {values.shape}, expected ({len(images)},)")
            parts[name] = values
            total += w * values
        return total, parts

    def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
        return self.score(images, prompts)[0]
