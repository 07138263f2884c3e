"""One learner worker's forward-process update (DiffusionNFT, RWR) on its shard (no Ray in here).

The shard holds clean samples x_0 with their conditioning (`TrajectoryBatch` with
`clean_only` latents [B, 1, ...]). For each of `inner_epochs` epochs the shard is shuffled and cut
into minibatches; each sample gets its own random permutation of the sampler's schedule steps
(less `skip_first_steps` / `skip_last_steps`), of which the first ceil(timestep_fraction * #steps)
are trained on. A micro-step noises x_0 to that step's level with fresh noise (x_t = alpha x_0 +
sigma eps), calls the network as sampling does (same guidance), and back-propagates the objective
of `loop_ray.forward_process`; gradients accumulate as in `update_on_shard`.

DiffusionNFT needs the old policy theta_old (`OldPolicy`): the samplers sample with it, the loss
calls it, and after the iteration's updates it moves towards theta by the EMA of the paper's soft
update, theta_old <- eta_i theta_old + (1 - eta_i) theta, i the optimizer steps taken so far.
"""

from __future__ import annotations

import contextlib
import time

import torch

from loop_ray.config import ExperimentConfig
from loop_ray.forward_process import (
    ema_update,
    nft_loss,
    noised,
    old_policy_decay,
    optimality_probability,
    rwr_loss,
    rwr_weights,
    target,
)
from loop_ray.training.update import backward_and_step, train_steps_per_sample
from loop_ray.trajectory import TrajectoryBatch


def forward_steps(cfg: ExperimentConfig, num_steps: int) -> torch.Tensor:
    """The schedule step indices a forward-process objective trains on: 0..T-1 less the first
    `skip_first_steps` and the last `skip_last_steps`."""
    a = cfg.algorithm
    steps = torch.arange(num_steps)[a.skip_first_steps : num_steps - a.skip_last_steps]
    if len(steps) == 0:
        raise ValueError(
            f"algorithm.skip_first_steps={a.skip_first_steps} + skip_last_steps={a.skip_last_steps} leave none "
            f"of the {num_steps} sampling steps to train on"
        )
    return steps


class OldPolicy:
    """theta_old: a copy of the policy's trainable weights (`PolicyBase._trainable_keys`) on its
    device, the number of optimizer steps behind the EMA's decay, and the weights swap."""

    def __init__(self, policy, cfg: ExperimentConfig):
        self.cfg = cfg.algorithm
        self.state = {k: v.detach().clone() for k, v in self._live(policy).items()}
        self.optimizer_steps = 0

    @staticmethod
    def _live(policy) -> dict[str, torch.Tensor]:
        """The network's tensors of the trainable keys (sharing storage with its parameters)."""
        state = policy._module().state_dict(keep_vars=True)
        return {k: state[k].data for k in policy._trainable_keys()}

    @torch.no_grad()
    def _swap(self, policy) -> None:
        for k, live in self._live(policy).items():
            held = live.clone()
            live.copy_(self.state[k])
            self.state[k].copy_(held)

    @contextlib.contextmanager
    def swapped(self, policy):
        """The policy's network carries theta_old inside the block and theta again after it."""
        self._swap(policy)
        try:
            yield
        finally:
            self._swap(policy)

    def update(self, policy, optimizer_steps: int) -> float:
        """Count `optimizer_steps` more steps and move theta_old towards theta; returns eta."""
        self.optimizer_steps += optimizer_steps
        a = self.cfg
        decay = old_policy_decay(self.optimizer_steps, a.nft_decay_rate, a.nft_decay_max, a.nft_decay_flat)
        ema_update(self.state, self._live(policy), decay)
        return decay

    def publishable(self) -> dict[str, torch.Tensor]:
        """theta_old as a sampler loads it (`load_trainable_state_dict`): detached CPU copies."""
        return {k: v.detach().cpu().clone() for k, v in self.state.items()}

    def state_dict(self) -> dict:
        return {"weights": self.publishable(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        if state["weights"].keys() != self.state.keys():
            raise KeyError("old policy checkpoint: its weights do not match the policy's trainable keys")
        with torch.no_grad():
            for k, v in state["weights"].items():
                self.state[k].copy_(v)
        self.optimizer_steps = int(state["optimizer_steps"])


def sampling_policy(policy, old: OldPolicy | None):
    """The block in which `policy` samples as the samplers do: with theta_old for DiffusionNFT (its
    samples come from the old policy), with its own weights otherwise."""
    return old.swapped(policy) if old is not None else contextlib.nullcontext()


def update_forward_on_shard(
    engine,
    policy,
    batch: TrajectoryBatch,
    advantages: torch.Tensor,
    cfg: ExperimentConfig,
    generator: torch.Generator,
    old: OldPolicy | None = None,
) -> dict[str, float]:
    """The configured epochs of the forward-process objective; returns this worker's metrics."""
    algo, mbs = cfg.algorithm, cfg.learner.minibatch_size
    if algo.objective == "nft" and old is None:
        raise ValueError("algorithm.objective=nft needs the old policy (OldPolicy)")
    steps = forward_steps(cfg, policy.num_steps)
    n_steps = train_steps_per_sample(cfg, len(steps))
    advantages = advantages.to(torch.float32).clamp(-algo.adv_clip_max, algo.adv_clip_max)
    r = optimality_probability(advantages, algo.adv_clip_max)
    weights = rwr_weights(advantages, algo.rwr_temperature) if algo.objective == "rwr" else None
    params = policy.trainable_parameters()
    values: dict[str, list[float]] = {}
    start, optimizer_steps = time.perf_counter(), 0
    num_samples = len(batch)
    for _ in range(algo.inner_epochs):
        order = torch.randperm(num_samples, generator=generator)
        for first in range(0, num_samples, mbs):
            idx = order[first : first + mbs]
            sub = batch.select(idx)
            x0 = sub.latents[:, -1].to(policy.device, torch.float32)
            cond = sub.conditioning()
            perms = torch.stack([torch.randperm(len(steps), generator=generator) for _ in range(len(idx))])
            chosen = steps[perms[:, :n_steps]]  # [b, n_steps]
            for j in range(n_steps):
                step_idx = chosen[:, j]
                alpha, sigma = policy.forward_coefficients(step_idx)
                alpha, sigma = alpha.to(policy.device, torch.float32), sigma.to(policy.device, torch.float32)
                noise = torch.randn(x0.shape, generator=generator).to(policy.device)
                x_t = noised(x0, noise, alpha, sigma)
                metrics: dict[str, float] = {}
                if algo.objective == "nft":
                    with torch.no_grad(), old.swapped(policy):
                        out_old = policy.model_output(x_t, step_idx, cond)
                    out = policy.model_output(x_t, step_idx, cond)
                    terms, metrics = nft_loss(
                        out, out_old, x_t, x0, alpha, sigma, r[idx].to(policy.device), algo.nft_beta,
                        policy.parametrisation, algo.nft_adaptive_weight,
                    )
                    loss = algo.adv_clip_max * terms.mean()  # the authors' scale (forward_process docstring)
                else:
                    out = policy.model_output(x_t, step_idx, cond)
                    goal = target(x0, noise, alpha, sigma, policy.parametrisation)
                    loss = rwr_loss(out, goal, weights[idx].to(policy.device)).mean()
                if algo.kl_beta > 0:
                    out_ref = policy.reference_output(x_t, step_idx, cond)
                    kl = ((out - out_ref) ** 2).flatten(1).mean(dim=1).mean()
                    loss = loss + algo.kl_beta * kl
                    metrics["kl_ref"] = kl.item()
                grad_norm = backward_and_step(engine, params, loss)
                if grad_norm is not None:
                    optimizer_steps += 1
                    values.setdefault("grad_norm", []).append(grad_norm)
                for key, v in {"loss": loss.item(), **metrics}.items():
                    values.setdefault(key, []).append(float(v))
    out_metrics = {key: sum(v) / len(v) for key, v in values.items()}
    if old is not None:
        out_metrics["old_decay"] = old.update(policy, optimizer_steps)
    nan = float("nan")
    return {
        **out_metrics,
        "grad_norm": out_metrics.get("grad_norm", nan),
        "grad_norm_max": max(values.get("grad_norm", [nan])),
        # no importance ratio in a forward-process objective: the ratio bounds are undefined
        **dict.fromkeys(("ratio_min", "ratio_max", "first_ratio_max_abs_dev"), nan),
        "r_mean": float(r.mean()),
        "optimizer_steps": optimizer_steps,
        "micro_steps": len(values.get("loss", [])),
        "samples": num_samples,
        "seconds": time.perf_counter() - start,
    }
