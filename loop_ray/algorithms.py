"""Advantage estimators and the policy loss of the paper's methods (pure torch).

Notation of Gupta et al., "A Simple and Effective Reinforcement Learning Method for Text-to-Image
Diffusion Fine-tuning" (LOOP): for a prompt c, K trajectories with rewards r_1..r_K; the
leave-one-out advantage is

    A_i = r_i - 1/(K-1) * sum_{j != i} r_j                                     (LOOP, eq. 8)

and the per-step objective of PPO/LOOP, with rho_t = exp(logp_theta(x_{t-1}|x_t,c) - logp_old),

    L = -E[ min(rho_t * A, clip(rho_t, 1 - eps, 1 + eps) * A) ]                 (LOOP, eq. 9)

averaged over samples, steps and prompts. Every method of the paper's study is a preset over
these same pieces (see PRESETS, tabled in the README).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

ESTIMATORS = ("none", "prompt_mean", "leave_one_out", "group_std", "stat_tracker", "batch_std")


def _check_groups(rewards: torch.Tensor, min_k: int, name: str) -> None:
    if rewards.ndim != 2:
        raise ValueError(f"{name}: rewards must be shaped [groups, K], got {tuple(rewards.shape)}")
    if rewards.shape[1] < min_k:
        raise ValueError(f"{name} needs K >= {min_k} samples per prompt, got K={rewards.shape[1]}")


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j for rewards [groups, K] (LOOP eq. 8; RLOO's baseline).

    The baseline of sample i excludes r_i, so it is independent of sample i and the policy
    gradient stays unbiased.
    """
    _check_groups(rewards, 2, "leave_one_out_advantages")
    K = rewards.shape[1]
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (K - 1)
    return rewards - baseline


def prompt_mean_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean_j r_j over the K samples of the prompt, r_i included (the paper's
    REINFORCE with baseline)."""
    _check_groups(rewards, 2, "prompt_mean_advantages")
    return rewards - rewards.mean(dim=1, keepdim=True)


def group_std_advantages(rewards: torch.Tensor, std_eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_j r_j) / (std_j r_j + std_eps): GRPO-style normalisation within the group
    (sample standard deviation, Bessel-corrected)."""
    _check_groups(rewards, 2, "group_std_advantages")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + std_eps)


def batch_std_advantages(rewards: torch.Tensor, std_eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean of its group) / (std over the whole batch + std_eps), the population std
    (DiffusionNFT's and Flow-GRPO's `global_std` normalisation)."""
    _check_groups(rewards, 2, "batch_std_advantages")
    mean = rewards.mean(dim=1, keepdim=True)
    return (rewards - mean) / (rewards.std(unbiased=False) + std_eps)


class StatTracker:
    """DDPO's per-prompt running statistics: A = (r - mean_c) / (std_c + std_eps), where mean_c and
    std_c are over the last `buffer_size` rewards of prompt c; while a prompt has fewer than
    `min_count` rewards, the statistics of the whole current batch stand in. Its state belongs in a
    checkpoint (state_dict / load_state_dict)."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16, std_eps: float = 1e-6):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.std_eps = std_eps
        self.history: dict[str, deque] = {}

    @classmethod
    def for_algorithm(cls, algorithm) -> StatTracker | None:
        """The tracker an `algorithm` config section (loop_ray.config.AlgorithmConfig) asks for: one
        with its stat_tracker_buffer, stat_tracker_min_count and std_eps when its advantage
        estimator is `stat_tracker`, else None. The one place a run's tracker is built."""
        if algorithm.advantage != "stat_tracker":
            return None
        return cls(algorithm.stat_tracker_buffer, algorithm.stat_tracker_min_count, algorithm.std_eps)

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add the rewards [N] of prompts [N] and return their advantages [N]."""
        rewards = rewards.to(torch.float64).flatten()
        if len(prompts) != rewards.numel():
            raise ValueError(f"StatTracker.update: {len(prompts)} prompts but {rewards.numel()} rewards")
        advantages = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = values.mean(), values.std(unbiased=False)
            advantages[idx] = (rewards[idx] - mean) / (std + self.std_eps)
        return advantages.to(torch.float32)

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "std_eps": self.std_eps,
            "history": {p: list(v) for p, v in self.history.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size = state["buffer_size"]
        self.min_count = state["min_count"]
        self.std_eps = state["std_eps"]
        self.history = {p: deque(v, maxlen=self.buffer_size) for p, v in state["history"].items()}


def compute_advantages(
    rewards: torch.Tensor,
    estimator: str,
    *,
    std_eps: float = 1e-6,
    stat_tracker: StatTracker | None = None,
    prompts: Sequence[str] | None = None,
) -> torch.Tensor:
    """Advantages [G, K] for rewards [G, K] (G prompts, K samples each) by the named estimator.

    none: A = r (REINFORCE); prompt_mean: r - mean of the prompt; leave_one_out: LOOP/RLOO;
    group_std: GRPO-style; batch_std: group mean over the batch's std (DiffusionNFT); stat_tracker: DDPO's per-prompt running mean/std (needs the tracker and
    the G prompts).
    """
    rewards = rewards.to(torch.float32)
    if rewards.ndim != 2:
        raise ValueError(f"compute_advantages: rewards must be shaped [groups, K], got {tuple(rewards.shape)}")
    if estimator == "none":
        return rewards.clone()
    if estimator == "prompt_mean":
        return prompt_mean_advantages(rewards)
    if estimator == "leave_one_out":
        return leave_one_out_advantages(rewards)
    if estimator == "group_std":
        return group_std_advantages(rewards, std_eps)
    if estimator == "batch_std":
        return batch_std_advantages(rewards, std_eps)
    if estimator == "stat_tracker":
        if stat_tracker is None or prompts is None:
            raise ValueError("compute_advantages: the stat_tracker estimator needs stat_tracker= and prompts=")
        if len(prompts) != rewards.shape[0]:
            raise ValueError(f"compute_advantages: {len(prompts)} prompts for {rewards.shape[0]} groups")
        K = rewards.shape[1]
        flat_prompts = [p for p in prompts for _ in range(K)]
        return stat_tracker.update(flat_prompts, rewards.flatten()).view_as(rewards)
    raise ValueError(f"unknown advantage estimator {estimator!r}; choose from {ESTIMATORS}")


STEP_WEIGHTS = ("none", "sigma", "output")


def step_loss_weights(sigmas: torch.Tensor, gains: torch.Tensor, trained: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-step loss weights w_j [T] (float32) that scale each trained step's term of the loss.

    With z ~ N(0, I) the step's noise, D the latent size, sigma_j the step's std and g_j = d mu_j /
    d(network output) (PolicyBase.mean_gain), the gradient of the mean-over-dims log-prob of step j
    with respect to the network output is

        d log p_j / d out = (x_{j+1} - mu_j) g_j / (sigma_j^2 D) = z g_j / (sigma_j D),

    so steps with a small sigma_j dominate the paper's unweighted sum with noise. `none`: w_j = 1
    (the paper). `sigma`: w_j proportional to sigma_j, which removes the 1/sigma_j. `output`: w_j
    proportional to sigma_j / |g_j|, so every step's term is z sign(g_j) / D in the network's output
    space. Normalised so that the largest weight over the `trained` step indices is 1 (a trained
    step with sigma_j = 0 or g_j = 0 gets 0)."""
    if mode not in STEP_WEIGHTS:
        raise ValueError(f"step weight {mode!r}: expected one of {STEP_WEIGHTS}")
    sigmas, gains = sigmas.to(torch.float64), gains.to(torch.float64)
    if mode == "none":
        w = torch.ones_like(sigmas)
    elif mode == "sigma":
        w = sigmas.clone()
    else:
        w = torch.where(gains.abs() > 0, sigmas / gains.abs().clamp_min(1e-300), torch.zeros_like(sigmas))
    top = w[torch.as_tensor(trained, dtype=torch.long)].max()
    if not top > 0:
        raise ValueError(f"step weight {mode!r}: every trained step has weight 0")
    return (w / top).to(torch.float32)


CONTROLS = ("none", "shuffle")


def control_seed(seed: int, iteration: int) -> int:
    """The seed of an iteration's control permutation (a function of the run's seed and the
    iteration alone, so a resumed run shuffles the same way)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, iteration, 0xC0]).generate_state(1)[0])


def apply_control(advantages: torch.Tensor, control: str, generator: torch.Generator) -> torch.Tensor:
    """The null of a learning claim. `none`: the advantages as they are. `shuffle`: the same values
    permuted across all samples (and groups) of the batch, so they keep their magnitudes but carry
    no information about which image was better; a run that learns no more than its shuffled
    control has learned nothing from the reward."""
    if control == "none":
        return advantages
    if control == "shuffle":
        flat = advantages.flatten()
        return flat[torch.randperm(flat.numel(), generator=generator)].view_as(advantages)
    raise ValueError(f"algorithm.control={control!r}: expected one of {CONTROLS}")


def policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    importance_sampling: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped importance-sampling loss of PPO/LOOP (eq. 9), or REINFORCE's -A * logp.

    With importance_sampling: rho = exp(logp_new - logp_old) and
        loss = mean( max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)) )
    (= -mean(min(rho A, clip(rho) A))), whose gradient at rho = 1 equals REINFORCE's and is zero
    where the clip is active on the side that would increase the objective further.
    Without it: loss = mean(-A * logp_new), the on-policy REINFORCE objective.

    All inputs share one shape (one entry per sample and step). Returns the scalar loss and
    metrics: clip_fraction (share with |rho - 1| > eps), approx_kl = 1/2 E[(logp_new - logp_old)^2],
    and rho's mean/min/max.
    """
    if not (logp_new.shape == logp_old.shape == advantages.shape):
        raise ValueError(
            f"policy_loss: shapes differ: logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)}, "
            f"advantages {tuple(advantages.shape)}"
        )
    log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    if importance_sampling:
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
        loss = torch.maximum(unclipped, clipped).mean()
    else:
        loss = (-advantages * logp_new).mean()
    with torch.no_grad():
        r = ratio.detach()
        metrics = {
            "clip_fraction": (torch.abs(r - 1.0) > clip_eps).float().mean().item(),
            "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean().item(),
            "ratio_mean": r.mean().item(),
            "ratio_min": r.min().item(),
            "ratio_max": r.max().item(),
        }
    return loss, metrics


# Deterministic sampling with independent noise per sample: DDIM eta 0 / the flow ODE
_DETERMINISTIC = {"sampling.eta": 0.0, "sampling.flow_noise_level": 0.0, "sampling.group_noise": "independent",
                  "sampling.sde_window": None, "sampling.sde_steps": None}

# The paper's methods as configurations of one code path: dotted config keys -> values. A preset
# fills only keys the experiment file leaves unset (see loop_ray.config).
PRESETS: dict[str, dict[str, object]] = {
    # REINFORCE: one sample per prompt, raw reward, on-policy
    "reinforce": {"sampling.k": 1, "algorithm.advantage": "none", "algorithm.importance_sampling": False,
                  "algorithm.inner_epochs": 1},
    # REINFORCE with a baseline: the prompt's mean reward over its K samples
    "reinforce_bc": {"sampling.k": 4, "algorithm.advantage": "prompt_mean",
                     "algorithm.importance_sampling": False, "algorithm.inner_epochs": 1},
    # RLOO: leave-one-out baseline, on-policy
    "rloo": {"sampling.k": 4, "algorithm.advantage": "leave_one_out", "algorithm.importance_sampling": False,
             "algorithm.inner_epochs": 1},
    # PPO as in DDPO: K = 1, per-prompt running statistics, clipped importance sampling
    "ppo": {"sampling.k": 1, "algorithm.advantage": "stat_tracker", "algorithm.importance_sampling": True},
    # LOOP, the method: K samples, leave-one-out baseline, clipped importance sampling
    "loop": {"sampling.k": 4, "algorithm.advantage": "leave_one_out", "algorithm.importance_sampling": True},
    # GRPO-style: group mean/std normalisation, clipped importance sampling
    "grpo": {"sampling.k": 4, "algorithm.advantage": "group_std", "algorithm.importance_sampling": True},
    # Forward-process methods (loop_ray.forward_process): clean samples from deterministic sampling
    # (eta 0 / the flow ODE, every sample its own noise), trained with the model's own denoising
    # loss, no log-probs. DiffusionNFT: group mean over the batch std (the authors' global_std,
    # +1e-4), r from the advantage clipped at adv_clip_max 5, beta 1, the old policy an EMA with decay
    # min(0.001 i, 0.5), KL weight 1e-4 on the outputs (the authors' config/base.py and config/nft.py
    # defaults: decay_type 1, beta 1.0, train.beta 1e-4; K 24 there, 4 here like LOOP)
    "nft": {"sampling.k": 4, "algorithm.objective": "nft", "algorithm.advantage": "batch_std",
            "algorithm.std_eps": 1e-4, "algorithm.adv_clip_max": 5.0, "algorithm.kl_beta": 1e-4,
            "algorithm.importance_sampling": False, "algorithm.inner_epochs": 1,
            **_DETERMINISTIC},
    # Reward-weighted regression (DDPO's RWR baseline): the denoising loss weighted by
    # exp(A / rwr_temperature), normalised over the batch; group-normalised advantages, no KL
    "rwr": {"sampling.k": 4, "algorithm.objective": "rwr", "algorithm.advantage": "group_std",
            "algorithm.kl_beta": 0.0, "algorithm.importance_sampling": False, "algorithm.inner_epochs": 1,
            **_DETERMINISTIC},
}
