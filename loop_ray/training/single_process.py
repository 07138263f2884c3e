"""One process, no Ray: the same iteration as the actor-learner system, piece for piece.

plan (loop_ray.training.plan) -> policy.sample -> reward -> advantages per group of K
(loop_ray.algorithms) -> update_on_shard (loop_ray.training.update) over a TorchEngine. It is what
the study runs many of side by side on one device, and the no-Ray baseline of the benchmarks; the
Ray system is the thing to use for anything bigger than one device. As in the Ray system, a group
with an invalid reward (NaN, inf, a wrong shape, an error) is rejected as a whole, and an iteration
whose groups were all rejected stops the run with InvalidRewardsError.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from loop_ray.algorithms import StatTracker, apply_control, compute_advantages, control_seed
from loop_ray.config import ExperimentConfig
from loop_ray.evaluation.evaluate import evaluate_policy
from loop_ray.prompts import load_prompts
from loop_ray.rewards.checks import InvalidRewardsError, describe_problems
from loop_ray.rewards.composite import CompositeReward
from loop_ray.training.forward_update import OldPolicy, sampling_policy, update_forward_on_shard
from loop_ray.training.plan import plan_iteration
from loop_ray.training.torch_engine import TorchEngine
from loop_ray.training.update import (
    build_learner_policy,
    grad_accum_steps,
    num_trainable_steps,
    update_on_shard,
)

log = logging.getLogger(__name__)


@dataclass
class SingleProcessRun:
    """A single-process trainer; `step(i)` is one iteration, `evaluate()` the held-out reward."""

    cfg: ExperimentConfig
    device: str = "cpu"
    policy: object = field(init=False)
    reward: CompositeReward = field(init=False)

    def __post_init__(self):
        cfg = self.cfg
        self.policy = build_learner_policy(cfg, self.device)
        self.reward = CompositeReward.from_config(cfg.reward)
        self.train_set = load_prompts(cfg.prompts.train)
        self.val_set = load_prompts(cfg.prompts.val)
        num_trainable = num_trainable_steps(cfg, self.policy)
        self.engine = TorchEngine(cfg, self.policy.trainable_parameters(), grad_accum_steps(cfg, num_trainable))
        a = cfg.algorithm
        self.stat_tracker = (
            StatTracker(a.stat_tracker_buffer, a.stat_tracker_min_count, a.std_eps) if a.advantage == "stat_tracker" else None
        )
        self.images_seen = 0
        # DiffusionNFT's old policy theta_old: it samples (and is evaluated), theta trains
        self.old = OldPolicy(self.policy, cfg) if a.objective == "nft" else None

    def sample_and_score(self, iteration: int):
        """Iteration `iteration`'s trajectories (the plan's prompts and seeds) with rewards and
        advantages attached, and the number of groups rejected for an invalid reward (left out of
        the batch); InvalidRewardsError when every group was."""
        cfg, k = self.cfg, self.cfg.sampling.k
        plan = plan_iteration(cfg, self.train_set, iteration)
        with sampling_policy(self.policy, self.old):
            batch = self.policy.sample(
                plan.prompts, k, plan.seeds, prompt_ids=plan.prompt_ids, group_ids=plan.group_ids,
                batch_size=cfg.sampling.batch_size, version=iteration, sde_steps=plan.sde_steps,
                group_noise=cfg.sampling.group_noise, clean_only=cfg.algorithm.objective != "policy_gradient",
            )
        scores = self.reward.score_checked(batch.images, batch.prompts)
        rewards = torch.as_tensor(scores.total, dtype=torch.float32).view(-1, k)
        valid = torch.isfinite(rewards).all(dim=1)  # [G]: a group with any invalid reward is rejected
        rejected = int((~valid).sum())
        if not valid.any():
            raise InvalidRewardsError(iteration, rejected, scores.problems)
        if rejected:
            log.warning("iteration %d: %d groups rejected for invalid rewards (not learned from): %s",
                        iteration, rejected, describe_problems(scores.problems))
            batch = batch.select(valid.repeat_interleave(k).nonzero().flatten())
        advantages = compute_advantages(
            rewards[valid], cfg.algorithm.advantage, std_eps=cfg.algorithm.std_eps,
            stat_tracker=self.stat_tracker, prompts=[p for p, ok in zip(plan.prompts, valid.tolist()) if ok],
        )
        generator = torch.Generator().manual_seed(control_seed(cfg.seed, iteration))
        advantages = apply_control(advantages, cfg.algorithm.control, generator).flatten()
        batch.rewards, batch.advantages = rewards[valid].flatten(), advantages
        return batch, rejected

    def learn(self, batch, iteration: int) -> dict:
        seed = int(np.random.SeedSequence([self.cfg.seed, iteration, 0]).generate_state(1)[0])
        if self.cfg.algorithm.objective != "policy_gradient":
            return update_forward_on_shard(self.engine, self.policy, batch, batch.advantages, self.cfg,
                                           torch.Generator().manual_seed(seed), self.old)
        return update_on_shard(
            self.engine, self.policy, batch, batch.advantages, self.cfg, torch.Generator().manual_seed(seed)
        )

    def step(self, iteration: int) -> dict:
        t0 = time.perf_counter()
        batch, rejected = self.sample_and_score(iteration)
        t1 = time.perf_counter()
        metrics = self.learn(batch, iteration)
        t2 = time.perf_counter()
        self.images_seen += len(batch) + rejected * self.cfg.sampling.k  # every image sampled
        return {
            "iteration": iteration,
            "images_seen": self.images_seen,
            "rejected_groups": rejected,
            "reward_mean": float(batch.rewards.mean()),
            "reward_std": float(batch.rewards.std()),
            "sample_score_seconds": t1 - t0,
            "learn_seconds": t2 - t1,
            **{f"learner/{k}": v for k, v in metrics.items()},
        }

    def evaluate(self, max_prompts: int | None = None) -> dict:
        e = self.cfg.eval
        n = max_prompts if max_prompts is not None else e.max_prompts
        indices = _spread(self.val_set.categories, n) if n is not None else None
        with sampling_policy(self.policy, self.old):
            return evaluate_policy(self.policy, self.reward, self.val_set, e.images_per_prompt, e.seed, e.batch_size, indices)

    def run(self, log: Callable[[dict], None] | None = None, before: dict | None = None) -> dict:
        """Evaluate, train `cfg.iterations` iterations, evaluate; returns the history. `before`: the
        pre-training evaluation when already known (the same model, eval prompts and seeds)."""
        before = self.evaluate() if before is None else before
        history = []
        for i in range(self.cfg.iterations):
            record = self.step(i)
            history.append(record)
            if log:
                log(record)
        after = self.evaluate()
        return {"before": _strip(before), "after": _strip(after), "history": history}

    def evaluate_before(self) -> dict:
        """The evaluation `run` starts with, in the form `run` returns it."""
        return _strip(self.evaluate())


def _spread(categories: list[str], n: int) -> list[int]:
    """The first n prompt indices taking the categories in turn (a fixed, balanced subset)."""
    by_cat: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        by_cat.setdefault(c, []).append(i)
    queues, out = [list(v) for v in by_cat.values()], []
    while len(out) < min(n, len(categories)):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return sorted(out)


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("images", "rewards", "per_prompt")}
