"""What each iteration samples, decided by the driver from cfg.seed and the iteration alone.

Iteration i draws `prompts_per_iteration` training prompts and one seed per sample from a
generator seeded with (cfg.seed, i), so a run (or a resumed run) samples the same prompts and
noise whatever the cluster looks like. Evaluation uses fixed prompts and seeds (cfg.eval.seed) so
every evaluation of a run, and of runs that share the eval settings, compares like with like.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from loop_ray.config import ExperimentConfig
from loop_ray.diffusion.windows import stochastic_steps
from loop_ray.evaluation.heldout import eval_prompt_indices, eval_seeds
from loop_ray.prompts import PromptSet

_SEED_HIGH = 2**62


@dataclass(frozen=True)
class SamplerJob:
    """One sampler's share: whole prompts, each with K seeds (the K of a prompt contiguous)."""

    prompts: list[str]
    prompt_ids: list[int]
    group_ids: list[int]
    seeds: list[int]  # len(prompts) * k
    categories: list[str]
    sde_steps: list[int] | None = None  # the iteration's stochastic steps (None: all)

    @property
    def num_samples(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class Plan:
    k: int
    prompts: list[str]
    prompt_ids: list[int]
    group_ids: list[int]
    seeds: list[int]
    categories: list[str]
    sde_steps: list[int] | None = None  # the iteration's stochastic steps (None: all; evaluation)

    def split(self, num_parts: int) -> list[SamplerJob]:
        """Consecutive whole-prompt shares for `num_parts` samplers (empty shares left out)."""
        bounds = np.linspace(0, len(self.prompts), num_parts + 1).round().astype(int)
        jobs = []
        for a, b in itertools.pairwise(bounds):
            if b > a:
                jobs.append(
                    SamplerJob(
                        self.prompts[a:b], self.prompt_ids[a:b], self.group_ids[a:b],
                        self.seeds[a * self.k : b * self.k], self.categories[a:b], self.sde_steps,
                    )
                )
        return jobs


def plan_iteration(cfg: ExperimentConfig, prompt_set: PromptSet, iteration: int) -> Plan:
    rng = np.random.default_rng([cfg.seed, iteration])
    n, k = cfg.sampling.prompts_per_iteration, cfg.sampling.k
    idx = rng.choice(len(prompt_set), size=n, replace=n > len(prompt_set)).tolist()
    seeds = rng.integers(0, _SEED_HIGH, size=n * k).tolist()
    return Plan(
        k=k,
        prompts=[prompt_set.prompts[i] for i in idx],
        prompt_ids=idx,
        group_ids=[iteration * n + g for g in range(n)],
        seeds=seeds,
        categories=[prompt_set.categories[i] for i in idx],
        sde_steps=stochastic_steps(cfg.sampling, iteration, cfg.iterations, cfg.seed),
    )


def plan_eval(cfg: ExperimentConfig, prompt_set: PromptSet) -> Plan:
    """All held-out prompts, or `eval.max_prompts` of them taken from the categories in turn (a
    fixed draw within each category); `eval.images_per_prompt` fixed seeds each (loop_ray.evaluation.heldout)."""
    idx = eval_prompt_indices(cfg, prompt_set)
    k = cfg.eval.images_per_prompt
    seeds = eval_seeds(cfg.eval.seed, idx, k)
    return Plan(
        k=k,
        prompts=[prompt_set.prompts[i] for i in idx],
        prompt_ids=idx,
        group_ids=list(range(len(idx))),
        seeds=seeds,
        categories=[prompt_set.categories[i] for i in idx],
    )
