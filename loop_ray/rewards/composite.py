"""The configured reward: a weighted sum of reward terms (registered names or import paths), each
built once. Every term's result is checked (`loop_ray.rewards.checks`): an image a term scored
invalid (NaN, inf, a wrong shape, an error) gets a NaN total, and the problem names the term."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from loop_ray.rewards import as_uint8_images, build_reward
from loop_ray.rewards.checks import call_reward


@dataclass
class Scores:
    """The total reward [B] (NaN where any term was invalid), each term's values [B] (NaN where
    that term was invalid) and what was wrong, one line per failing term call."""

    total: np.ndarray
    parts: dict[str, np.ndarray]
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.total)


class CompositeReward:
    """r(x_0, c) = sum_n w_n r_n(x_0, c) over the configured reward terms.

    `score` also returns each term's raw values so they can be logged; `score_checked` also says
    what was wrong. Neither raises for a misbehaving term: its images get NaN.
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

    def score_checked(self, images, prompts: Sequence[str]) -> Scores:
        images = as_uint8_images(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        parts, problems = {}, []
        total = np.zeros(len(images), dtype=np.float32)
        for name, w, reward in zip(self.names, self.weights, self.rewards):
            values, problem = call_reward(reward, images, prompts, name)
            if problem is not None:
                problems.append(problem)
            parts[name] = values
            total += w * values  # NaN stays NaN whatever the weight
        return Scores(total, parts, problems)

    def score(self, images, prompts: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        scores = self.score_checked(images, prompts)
        return scores.total, scores.parts

    def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
        return self.score(images, prompts)[0]
