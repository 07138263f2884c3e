"""Sample and score one iteration without Ray: the step the single-process loop and the diagnostic
share, piece for piece what the Ray samplers, reward servers and buffer do.

plan (loop_ray.training.plan) -> policy.sample (K per prompt, the plan's seeds and stochastic
steps, the config's group noise) -> reward -> a group with any invalid reward (NaN, inf, wrong
shape, an error) rejected as a whole -> advantages per group (loop_ray.algorithms) -> the
shuffled control when asked. The advantages are not clamped here: the learner clamps them to
+-adv_clip_max where it uses them.
"""

from __future__ import annotations

import logging

import torch

from loop_ray.algorithms import apply_control, compute_advantages, control_seed
from loop_ray.rewards.checks import InvalidRewardsError, describe_problems
from loop_ray.training.plan import plan_iteration

log = logging.getLogger(__name__)


def sample_and_score(cfg, policy, reward, prompt_set, iteration: int, stat_tracker=None, control: str | None = None,
                     clean_only: bool = False):
    """(batch, rejected): iteration `iteration`'s trajectories with `batch.rewards` and
    `batch.advantages` [B] attached, and how many groups were rejected for an invalid reward (left
    out of the batch). `control` (default `cfg.algorithm.control`): "shuffle" permutes the
    advantages across the batch with the iteration's control seed. InvalidRewardsError when every
    group was rejected. `clean_only`: the record keeps x_0 and its conditioning only (the
    forward-process objectives need no trajectory)."""
    k, algo = cfg.sampling.k, cfg.algorithm
    plan = plan_iteration(cfg, prompt_set, iteration)
    batch = policy.sample(
        plan.prompts, k, plan.seeds, prompt_ids=plan.prompt_ids, group_ids=plan.group_ids,
        batch_size=cfg.sampling.batch_size, version=iteration, sde_steps=plan.sde_steps,
        group_noise=cfg.sampling.group_noise, clean_only=clean_only,
    )
    scores = reward.score_checked(batch.images, batch.prompts)
    rewards = torch.as_tensor(scores.total, dtype=torch.float32).view(-1, k)
    valid = torch.isfinite(rewards).all(dim=1)  # [G]
    rejected = int((~valid).sum())
    if not valid.any():
        raise InvalidRewardsError(iteration, rejected, scores.problems)
    if rejected:
        log.warning("iteration %d: %d groups rejected for invalid rewards (not learned from): %s",
                    iteration, rejected, describe_problems(scores.problems))
        batch = batch.select(valid.repeat_interleave(k).nonzero().flatten())
    advantages = compute_advantages(
        rewards[valid], algo.advantage, std_eps=algo.std_eps, stat_tracker=stat_tracker,
        prompts=[p for p, ok in zip(plan.prompts, valid.tolist()) if ok],
    )
    generator = torch.Generator().manual_seed(control_seed(cfg.seed, iteration))
    advantages = apply_control(advantages, algo.control if control is None else control, generator)
    batch.rewards, batch.advantages = rewards[valid].flatten(), advantages.flatten()
    return batch, rejected
