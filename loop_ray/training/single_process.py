"""One process, no Ray: the same iteration as the actor-learner system, piece for piece.

plan (loop_ray.training.plan) -> policy.sample -> reward -> advantages per group of K
(loop_ray.algorithms) -> update_on_shard (loop_ray.training.update) over a TorchEngine. It is what
the study runs many of side by side on one device, and the no-Ray baseline of the benchmarks; the
Ray system is the thing to use for anything bigger than one device. As in the Ray system, a group
with an invalid reward (NaN, inf, a wrong shape, an error) is rejected as a whole, and an iteration
whose groups were all rejected stops the run with InvalidRewardsError.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from loop_ray.algorithms import StatTracker
from loop_ray.config import ExperimentConfig
from loop_ray.evaluation.evaluate import evaluate_policy
from loop_ray.evaluation.heldout import eval_prompt_indices
from loop_ray.prompts import load_prompts
from loop_ray.rewards.composite import CompositeReward
from loop_ray.training.forward_update import OldPolicy, sampling_policy, update_forward_on_shard
from loop_ray.training.learner_metrics import learner_record
from loop_ray.training.sample_score import sample_and_score
from loop_ray.training.torch_engine import TorchEngine
from loop_ray.training.update import (
    build_learner_policy,
    grad_accum_steps,
    num_trainable_steps,
    update_on_shard,
)


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
        self.stat_tracker = StatTracker.for_algorithm(cfg.algorithm)
        self.images_seen = 0
        # DiffusionNFT's old policy theta_old: it samples (and is evaluated), theta trains
        self.old = OldPolicy(self.policy, cfg) if cfg.algorithm.objective == "nft" else None

    def sample_and_score(self, iteration: int):
        """Iteration `iteration`'s scored trajectories and the number of groups rejected
        (loop_ray.training.sample_score), sampled as the samplers sample (with theta_old for
        DiffusionNFT; clean samples only for a forward-process objective)."""
        with sampling_policy(self.policy, self.old):
            return sample_and_score(self.cfg, self.policy, self.reward, self.train_set, iteration, self.stat_tracker,
                                    clean_only=self.cfg.algorithm.objective != "policy_gradient")

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
        metrics = self.learn(batch, iteration)
        t1 = time.perf_counter()
        images = len(batch) + rejected * self.cfg.sampling.k  # every image sampled
        self.images_seen += images
        return {  # the Ray driver's names for the same figures (loop_ray.system.run.metrics)
            "kind": "train",
            "iteration": iteration,
            "images_seen": self.images_seen,
            "train/rejected_groups": rejected,
            "train/reward_mean": float(batch.rewards.mean()),
            "train/reward_std": float(batch.rewards.std(unbiased=False)),
            "train/advantage_abs_mean": float(batch.advantages.abs().mean()),
            "iteration_seconds": t1 - t0,
            "throughput/images_per_s": images / (t1 - t0) if t1 > t0 else float("nan"),
            **learner_record([metrics]),
        }

    def evaluate(self) -> dict:
        """The held-out reward on the prompts and seeds every evaluation path uses
        (loop_ray.evaluation.heldout)."""
        e = self.cfg.eval
        indices = eval_prompt_indices(self.cfg, self.val_set)
        with sampling_policy(self.policy, self.old):
            return evaluate_policy(self.policy, self.reward, self.val_set, e.images_per_prompt, e.seed, e.batch_size,
                                   indices)

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


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("images", "rewards", "per_prompt")}
