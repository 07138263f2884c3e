"""Forward-process objectives: DiffusionNFT and reward-weighted regression (pure torch).

Both train on clean samples x_0 of the sampling policy, noised by the forward process, with the
model's own denoising loss; neither needs a log-probability or a stored trajectory.

Forward process and parametrisations. At a training timestep with coefficients (alpha, sigma),

    x_t = alpha x_0 + sigma eps,    eps ~ N(0, I).

DDIM/SD models (DDPM's variance-preserving process, alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t))
predict eps ("epsilon") or v = alpha eps - sigma x_0 ("v_prediction"); rectified-flow models
(SD3, FLUX: alpha = 1 - s, sigma = s) predict the velocity v = eps - x_0 ("velocity"). In every
case the predicted clean sample is an affine function of the network output o at fixed (x_t, t):

    epsilon:       x0_hat = (x_t - sigma o) / alpha          (b = -sigma / alpha)
    v_prediction:  x0_hat = alpha x_t - sigma o              (b = -sigma)
    velocity:      x0_hat = x_t - sigma o                    (b = -sigma)
    sample:        x0_hat = o                                (b = 1)

so x0_hat(o) - x_0 = b (o - o*), o* the output's regression target (`target`). Two consequences
make the objectives below parametrisation-free:
  1. a convex or affine mixture of outputs (weights summing to 1) maps to the same mixture of
     x0_hat, so DiffusionNFT's implicit policies are the same distributions whichever quantity
     the network outputs;
  2. the squared x_0 error is b^2 times the model's native squared error, so minimising either
     fits the same conditional mean E[x_0 | x_t] (tests/test_forward_process.py checks a flow
     model's velocity loss against the same model written as an eps-predictor).

DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
arXiv 2509.16117; its authors' public training code for the numbers). With the old (sampling)
policy's output o_old and the trained one's o_theta, the implicit positive and negative policies
(paper eq. 5's definitions, Algorithm 1 lines 10-11) are

    o+ = (1 - beta) o_old + beta o_theta,      o- = (1 + beta) o_old - beta o_theta,

and with the optimality probability r in [0, 1] of each clean sample the loss (paper eq. 5) is

    L = E[ r ||x0_hat(o+) - x_0||^2 + (1 - r) ||x0_hat(o-) - x_0||^2 ]

written, as the authors train it, in x_0 space with the paper's adaptive loss weighting (each sample's squared error divided by its detached mean absolute error, floored at 1e-5) and
scaled by adv_clip_max / beta (the authors' code; `nft_loss` returns the per-sample terms, the
caller applies the scale). The gradient is (2/beta) sum [r (x0+ - x_0) - (1 - r)(x0- - x_0)] beta
d x0_hat(o_theta): at theta = old both mixtures equal o_old and it is 2 (2r - 1)(x0_old - x_0)
times the Jacobian, zero at r = 1/2; with beta = 1 and r = 1 the positive term is the plain
(adaptively weighted) supervised loss of o_theta.

The reward mapping (the paper's optimality reward normalisation; the constants from the authors' code):
A = (R - mean of the prompt's group) / (std over the whole batch + 1e-4), clipped to
+-adv_clip_max, and r = 1/2 + A / (2 adv_clip_max) in [0, 1].

Reward-weighted regression (Peters & Schaal 2007; the RWR baseline of DDPO, Black et al. 2023,
sec. 4.3): the model's native denoising loss with exponential weights,

    L = mean_i w_i ||o_theta,i - o*_i||^2,   w_i = exp(A_i / tau) / mean_j exp(A_j / tau)

over the batch (weights normalised to mean 1), A the configured advantage.
"""

from __future__ import annotations

import torch

PARAMETRISATIONS = ("epsilon", "v_prediction", "velocity", "sample")


def _bcast(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(-1, *[1] * (like.dim() - 1)) if value.dim() else value


def noised(x0: torch.Tensor, noise: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """x_t = alpha x_0 + sigma eps (alpha, sigma scalars or [B])."""
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise


def predicted_x0(output: torch.Tensor, x_t: torch.Tensor, alpha, sigma, parametrisation: str) -> torch.Tensor:
    """x0_hat from the network output in its own parametrisation (module docstring's table)."""
    a, s = _bcast(alpha, output), _bcast(sigma, output)
    x_t = x_t.to(output.dtype)
    if parametrisation == "epsilon":
        return (x_t - s * output) / a
    if parametrisation == "v_prediction":
        return a * x_t - s * output
    if parametrisation == "velocity":
        return x_t - s * output
    if parametrisation == "sample":
        return output
    raise ValueError(f"parametrisation {parametrisation!r}: expected one of {PARAMETRISATIONS}")


def target(x0: torch.Tensor, noise: torch.Tensor, alpha, sigma, parametrisation: str) -> torch.Tensor:
    """The regression target o* of the network output (its supervised denoising loss's target)."""
    a, s = _bcast(alpha, x0), _bcast(sigma, x0)
    if parametrisation == "epsilon":
        return noise
    if parametrisation == "v_prediction":
        return a * noise - s * x0
    if parametrisation == "velocity":
        return noise - x0
    if parametrisation == "sample":
        return x0
    raise ValueError(f"parametrisation {parametrisation!r}: expected one of {PARAMETRISATIONS}")


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """r = 1/2 + clip(A, -c, c) / (2c) in [0, 1] (DiffusionNFT's reward mapping, c = adv_clip_max)."""
    return 0.5 + advantages.clamp(-adv_clip_max, adv_clip_max) / (2.0 * adv_clip_max)


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def adaptive_squared_error(x0_hat: torch.Tensor, x0: torch.Tensor, adaptive: bool = True, floor: float = 1e-5):
    """[B] mean_d (x0_hat - x_0)^2, divided by the detached mean_d |x0_hat - x_0| (floored) when
    `adaptive` (DiffusionNFT's adaptive loss weighting)."""
    err = x0_hat - x0.to(x0_hat.dtype)
    sq = _per_sample_mean(err**2)
    if not adaptive:
        return sq
    with torch.no_grad():
        weight = _per_sample_mean(err.abs().double()).clamp(min=floor).to(sq.dtype)
    return sq / weight


def nft_loss(
    out_theta: torch.Tensor,
    out_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    alpha,
    sigma,
    r: torch.Tensor,
    beta: float,
    parametrisation: str,
    adaptive: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-sample DiffusionNFT terms [B]: (r L+ + (1 - r) L-) / beta (module docstring, eq. 5), and
    metrics (the positive and negative losses, the mean squared deviation of o_theta from o_old).
    `out_old` is treated as a constant."""
    if not 0.0 < beta:
        raise ValueError(f"nft_loss: beta must be > 0, got {beta}")
    out_old = out_old.detach().to(out_theta.dtype)
    positive = beta * out_theta + (1.0 - beta) * out_old
    negative = (1.0 + beta) * out_old - beta * out_theta
    loss_pos = adaptive_squared_error(predicted_x0(positive, x_t, alpha, sigma, parametrisation), x0, adaptive)
    loss_neg = adaptive_squared_error(predicted_x0(negative, x_t, alpha, sigma, parametrisation), x0, adaptive)
    r = r.to(loss_pos.dtype)
    terms = (r * loss_pos + (1.0 - r) * loss_neg) / beta
    with torch.no_grad():
        metrics = {
            "nft_positive_loss": loss_pos.mean().item(),
            "nft_negative_loss": loss_neg.mean().item(),
            "old_deviation": _per_sample_mean((out_theta - out_old) ** 2).mean().item(),
        }
    return terms, metrics


def rwr_weights(advantages: torch.Tensor, temperature: float) -> torch.Tensor:
    """w_i = exp(A_i / tau) / mean_j exp(A_j / tau) over the batch (mean 1; computed stably)."""
    if not temperature > 0:
        raise ValueError(f"rwr_weights: temperature must be > 0, got {temperature}")
    return torch.softmax(advantages.flatten().double() / temperature, dim=0).mul(advantages.numel()).to(
        torch.float32
    ).view_as(advantages)


def rwr_loss(out_theta: torch.Tensor, out_target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted native denoising loss [B]: w_i mean_d (o_theta - o*)^2."""
    return weights.to(out_theta.dtype) * _per_sample_mean((out_theta - out_target.to(out_theta.dtype)) ** 2)


def old_policy_decay(step: int, rate: float, max_decay: float, flat: int = 0) -> float:
    """eta_i of the old policy's EMA theta_old <- eta theta_old + (1 - eta) theta after optimizer
    step i: 0 for i < flat, then min(rate (i - flat), max_decay) (the authors' schedule; their
    default is rate 0.001, max 0.5, flat 0)."""
    if step < flat:
        return 0.0
    return min(rate * (step - flat), max_decay)


@torch.no_grad()
def ema_update(old: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float) -> None:
    """old <- decay old + (1 - decay) current, in place, key by key."""
    if old.keys() != current.keys():
        raise KeyError(f"ema_update: keys differ: {sorted(old.keys() ^ current.keys())[:5]}")
    for k, v in old.items():
        v.mul_(decay).add_(current[k].to(v.device, v.dtype), alpha=1.0 - decay)
