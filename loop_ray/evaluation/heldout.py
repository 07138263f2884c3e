"""The held-out evaluation's fixed draw: which prompts and which seeds, shared by the training
driver's evaluation (`loop_ray.training.plan.plan_eval`) and `loop-ray eval` (`loop_ray.evaluation.evaluate`).

It imports nothing from loop_ray (the config only for type hints), so both may import it without
importing each other. Image j of prompt i (i its index in the prompt source) uses the seed
seed * SEED_STRIDE + i * images_per_prompt + j.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from loop_ray.config import ExperimentConfig

SEED_STRIDE = 1_000_003


def eval_seeds(seed: int, prompt_indices: Sequence[int], images_per_prompt: int) -> list[int]:
    """Per-image seeds: seed * SEED_STRIDE + i * images_per_prompt + j for prompt index i, image j."""
    k = images_per_prompt
    return [seed * SEED_STRIDE + i * k + j for i in prompt_indices for j in range(k)]


def eval_prompt_indices(cfg: ExperimentConfig, prompt_set) -> list[int]:
    """All held-out prompts, or `eval.max_prompts` of them taken from the categories in turn (a
    fixed draw within each category, seeded by eval.seed), in source order."""
    n = len(prompt_set)
    idx = list(range(n))
    if cfg.eval.max_prompts is not None and cfg.eval.max_prompts < n:
        rng = np.random.default_rng(cfg.eval.seed)
        by_category: dict[str, list[int]] = {}
        for i, c in enumerate(prompt_set.categories):
            by_category.setdefault(c, []).append(i)
        queues = [list(rng.permutation(v)) for v in by_category.values()]
        idx = []
        while len(idx) < cfg.eval.max_prompts:
            for q in queues:
                if q and len(idx) < cfg.eval.max_prompts:
                    idx.append(int(q.pop(0)))
        idx.sort()
    return idx
