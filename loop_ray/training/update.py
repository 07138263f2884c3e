"""One learner worker's update on its shard of an iteration's samples (no Ray in here).

For each of `inner_epochs` epochs the shard is shuffled and cut into minibatches; each sample
gets its own random permutation of its trainable steps (its stochastic steps, all of them or the
iteration's `sde_steps`, without the first `skip_first_steps` and last `skip_last_steps` of them:
`policy.trainable_steps_of`), of which the first ceil(timestep_fraction * #steps) are trained on,
as in DDPO. A micro-step is one minibatch at one
sampled step per sample: the log-probs are recomputed under the current weights (same CFG as
sampling), the advantages clamped to +-adv_clip_max, and the clipped importance-sampling loss of
`loop_ray.algorithms.policy_loss`, with each step's advantages scaled by its `algorithm.step_weight`
(plus kl_beta times the KL to the reference policy when
`algorithm.kl_beta` > 0) back-propagated. Gradients accumulate over the sampled steps and
`minibatches_per_step` minibatches before one optimizer step (DeepSpeed's accumulation boundary).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from loop_ray.algorithms import policy_loss, step_loss_weights
from loop_ray.config import ExperimentConfig
from loop_ray.training.deepspeed_engine import engine_grad_norm, held_grad_norm
from loop_ray.trajectory import TrajectoryBatch


def train_steps_per_sample(cfg: ExperimentConfig, num_trainable: int) -> int:
    return max(1, math.ceil(cfg.algorithm.timestep_fraction * num_trainable))


def grad_accum_steps(cfg: ExperimentConfig, num_trainable: int) -> int:
    """Micro-steps per optimizer step: sampled steps per sample x minibatches per step."""
    return train_steps_per_sample(cfg, num_trainable) * cfg.learner.minibatches_per_step


def build_learner_policy(cfg: ExperimentConfig, device: str):
    """The policy a learner trains: `build_policy`, keeping its starting weights as the reference of
    the KL term when `algorithm.kl_beta` > 0 (before any checkpoint load, so a resumed run keeps the
    same reference). Samplers build theirs with `build_policy` alone."""
    from loop_ray.diffusion.factory import build_policy

    policy = build_policy(cfg, device)
    if cfg.algorithm.kl_beta > 0:
        policy.keep_reference()
    return policy


def num_trainable_steps(cfg: ExperimentConfig, policy) -> int:
    """How many steps of each sample may be trained on (the same in every iteration: a window has a
    fixed size), from iteration 0's stochastic steps; for a forward-process objective, the schedule
    steps it trains on (`forward_update.forward_steps`)."""
    from loop_ray.diffusion.windows import stochastic_steps

    algo = cfg.algorithm
    if algo.objective != "policy_gradient":
        from loop_ray.training.forward_update import forward_steps

        return len(forward_steps(cfg, policy.num_steps))
    sde_steps = stochastic_steps(cfg.sampling, 0, cfg.iterations, cfg.seed)
    return len(policy.trainable_steps(algo.skip_first_steps, algo.skip_last_steps, sde_steps))


def policy_step_weights(policy, steps: torch.Tensor, mode: str) -> torch.Tensor | None:
    """The per-step loss weights w_j [T] of `algorithm.step_weight` for the trained step indices
    `steps` [B, n] (loop_ray.algorithms.step_loss_weights); None for `none` (every weight 1)."""
    if mode == "none":
        return None
    every = torch.arange(policy.num_steps)
    return step_loss_weights(policy.sigmas, policy.mean_gain(every), steps.unique(), mode)


def backward_and_step(engine, params, loss: torch.Tensor) -> float | None:
    """One micro-step: back-propagate `loss`, let the engine step; at an accumulation boundary (an
    optimizer step) return the pre-clipping gradient norm, else None."""
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    held = held_grad_norm(engine, params) if boundary else None
    engine.step()
    return engine_grad_norm(engine, held) if boundary else None


@dataclass
class _Log:
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, **kv: float) -> None:
        for k, v in kv.items():
            if v is not None:
                self.values.setdefault(k, []).append(float(v))

    def mean(self, key: str) -> float:
        v = self.values.get(key, [])
        return sum(v) / len(v) if v else float("nan")


def update_on_shard(
    engine, policy, batch: TrajectoryBatch, advantages: torch.Tensor, cfg: ExperimentConfig, generator: torch.Generator
) -> dict[str, float]:
    """Run the configured epochs of clipped-IS updates; returns this worker's metrics."""
    algo, mbs = cfg.algorithm, cfg.learner.minibatch_size
    steps = policy.trainable_steps_of(batch, algo.skip_first_steps, algo.skip_last_steps)  # [B, n]
    n_steps = train_steps_per_sample(cfg, steps.shape[1])
    advantages = advantages.to(torch.float32).clamp(-algo.adv_clip_max, algo.adv_clip_max)
    weights = policy_step_weights(policy, steps, algo.step_weight)  # [T] or None
    params = policy.trainable_parameters()
    log, first_dev = _Log(), 0.0
    num_samples, start = len(batch), time.perf_counter()
    optimizer_steps = 0
    for _ in range(algo.inner_epochs):
        order = torch.randperm(num_samples, generator=generator)
        for mb, first in enumerate(range(0, num_samples, mbs)):
            idx = order[first : first + mbs]
            sub = batch.select(idx)
            adv = advantages[idx]
            perms = torch.stack([torch.randperm(steps.shape[1], generator=generator) for _ in range(len(idx))])
            chosen = steps[idx].gather(1, perms[:, :n_steps])  # [b, n_steps] step indices, one permutation per sample
            for j in range(n_steps):
                step_idx = chosen[:, j]
                if algo.kl_beta > 0:
                    logp_new, kl = policy.log_prob_and_reference_kl(sub, step_idx)
                else:
                    logp_new, kl = policy.log_prob(sub, step_idx), None
                logp_old = sub.log_probs.gather(1, step_idx[:, None]).squeeze(1).to(logp_new.device)
                adv_j = adv if weights is None else adv * weights[step_idx]  # -min(rho A w, clip(rho) A w), w > 0
                loss, m = policy_loss(logp_new, logp_old, adv_j.to(logp_new.device), algo.clip_eps, algo.importance_sampling)
                if kl is not None:
                    kl = kl.mean()
                    loss = loss + algo.kl_beta * kl
                    m["kl_ref"] = kl.item()
                grad_norm = backward_and_step(engine, params, loss)
                if grad_norm is not None:
                    optimizer_steps += 1
                    log.add(grad_norm=grad_norm)
                log.add(loss=loss.item(), **m)
                if optimizer_steps == 0 and mb == 0:  # before any update: the ratio must be 1
                    first_dev = max(first_dev, abs(m["ratio_max"] - 1.0), abs(1.0 - m["ratio_min"]))
    seconds = time.perf_counter() - start
    v = log.values
    kl_ref = {"kl_ref": log.mean("kl_ref")} if algo.kl_beta > 0 else {}  # the KL to the reference policy
    return {
        **kl_ref,
        "loss": log.mean("loss"),
        "clip_fraction": log.mean("clip_fraction"),
        "approx_kl": log.mean("approx_kl"),
        "ratio_mean": log.mean("ratio_mean"),
        "ratio_min": min(v.get("ratio_min", [float("nan")])),
        "ratio_max": max(v.get("ratio_max", [float("nan")])),
        "grad_norm": log.mean("grad_norm"),
        "grad_norm_max": max(v.get("grad_norm", [float("nan")])),
        "first_ratio_max_abs_dev": first_dev,
        "optimizer_steps": optimizer_steps,
        "micro_steps": len(v.get("loss", [])),
        "samples": num_samples,
        "seconds": seconds,
        "last_clip_fraction": v["clip_fraction"][-1] if v.get("clip_fraction") else float("nan"),
    }
