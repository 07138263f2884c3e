"""The configured reward: a weighted sum of reward terms (registered names or import paths), each
built once. Every term's result is checked (`loop_ray.rewards.checks`): an image a term scored
invalid (NaN, inf, a wrong shape, an error) gets a NaN total, and the problem names the term.

In the Ray system the terms may be scored by different reward actors (`term_groups`): a term with
its own Ray runtime_env runs in actors started in that environment, and the weighted sum of each
group's terms is added up afterwards (`combine_scores`), so a composite over a subset of the terms
(`CompositeReward.from_config(cfg, terms)`) is the unit a reward actor scores.
"""

from __future__ import annotations

import json
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
    def from_config(cls, reward_cfg, terms: Sequence[int] | None = None) -> CompositeReward:
        """The configured terms, or only those at the indices `terms` (one reward actor's share)."""
        chosen = reward_cfg.terms if terms is None else [reward_cfg.terms[i] for i in terms]
        return cls([(t.name, t.weight, dict(t.kwargs)) for t in chosen])

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


@dataclass(frozen=True)
class TermGroup:
    """Reward terms scored by the same reward actors: their indices in reward.terms and the Ray
    runtime_env those actors start in (a RuntimeEnvConfig, or None for the node's own)."""

    terms: tuple[int, ...]
    runtime_env: object | None
    shared: bool  # the group of the terms without a runtime_env of their own

    def describe(self, reward_cfg) -> str:
        return ", ".join(f"reward.terms.{i} ({reward_cfg.terms[i].name})" for i in self.terms)


def term_groups(reward_cfg) -> list[TermGroup]:
    """Which reward actors score which terms. The terms without a runtime_env of their own form the
    shared group (first; in `reward.runtime_env` when that is set); terms with equal runtime_envs
    form one group each, in the order of their first term."""
    terms = reward_cfg.terms
    shared = tuple(i for i, t in enumerate(terms) if t.runtime_env is None)
    groups = [TermGroup(shared, reward_cfg.runtime_env, True)] if shared else []
    by_env: dict[str, list[int]] = {}
    for i, t in enumerate(terms):
        if t.runtime_env is not None:
            by_env.setdefault(json.dumps(t.runtime_env.to_ray(), sort_keys=True), []).append(i)
    groups += [TermGroup(tuple(ix), terms[ix[0]].runtime_env, False) for ix in by_env.values()]
    return groups


def combine_scores(partials: Sequence[dict]) -> dict:
    """One chunk's reward result from the results of the term groups that scored it (each a
    reward actor's `score` answer for the same images): totals added (NaN stays NaN), parts and
    problems gathered. Rank, start and image count are the first group's; seconds the slowest
    group's, as the groups score side by side."""
    if not partials:
        raise ValueError("combine_scores needs at least one group's result")
    first = partials[0]
    for p in partials[1:]:
        if p["start"] != first["start"] or p["images"] != first["images"]:
            raise ValueError(f"results of different chunks: start {p['start']} / {first['start']}, "
                             f"images {p['images']} / {first['images']}")
    total = np.zeros(first["images"], np.float32)
    parts: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for p in partials:
        total += np.asarray(p["rewards"], np.float32)
        parts.update(p["parts"])
        problems += p["problems"]
    return {**first, "rewards": total, "parts": parts, "problems": problems,
            "seconds": max(p["seconds"] for p in partials)}
