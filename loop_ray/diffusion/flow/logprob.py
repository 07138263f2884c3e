"""One stochastic step of a rectified-flow sampler and the Gaussian log-density of its result.

The flow-matching counterpart of `logprob.ddim_step_with_logprob`: the same function draws x_{s'}
while sampling and scores a stored x_{s'} while learning, so logp_old and the recomputed log-prob
share every operation.

Notation of diffusers' FlowMatchEulerDiscreteScheduler (rectified flow, Liu et al. 2022; SD3,
Esser et al. 2024): a noise level s in [0, 1] (the scheduler's `sigmas`, shift already applied)
interpolates data and noise,

    x_s = (1 - s) x_0 + s eps,   eps ~ N(0, I),

the transformer predicts the velocity v = v_theta(x_s, s) ~ eps - x_0, and a sampler walks the
schedule s_0 > s_1 > ... > s_T = 0 one step s -> s' at a time. From v follow the predicted end points

    x0_hat = x_s - s v,    eps_hat = x_s + (1 - s) v.

ODE (FlowMatchEulerDiscreteScheduler.step):  x_{s'} = x_s + (s' - s) v.

"sde" (Flow-GRPO: Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL",
arXiv 2505.05470, sec. 4.2 and its appendix). The reverse-time SDE with the ODE's marginals adds the
score correction; with the flow's score grad log p_s(x) = -eps_hat / s it reads

    dx = [v + sigma_s^2 / (2 s) (x + (1 - s) v)] ds + sigma_s dw,    sigma_s = a sqrt(s / (1 - s)),

a the noise level (0.7 in Flow-GRPO). Euler-Maruyama over ds = s' - s < 0 gives the Gaussian step

    mu  = x_s + [v + sigma_s^2 / (2 s) (x_s + (1 - s) v)] (s' - s)
    std = sigma_s sqrt(s - s')

At s = 1 (the first step of an unshifted or shifted schedule that starts at pure noise) s / (1 - s)
is infinite; as Flow-GRPO does, the denominator 1 - s is then replaced by 1 - s_1, the schedule's
second noise level, so sigma_{s_0} = a sqrt(1 / (1 - s_1)).

"cps" (Flow-CPS: Wang & Yu, "Coefficients-Preserving Sampling for Reinforcement Learning with Flow
Matching", arXiv 2509.05952). The step re-noises the predicted x_0 so that x_{s'} keeps the
coefficients (1 - s', s') of the interpolation exactly, with a share sin(a pi / 2) of fresh noise:

    std = s' sin(a pi / 2)
    mu  = (1 - s') x0_hat + sqrt(s'^2 - std^2) eps_hat

so the last step (s' = 0) is deterministic, and the plain SDE's excess noise at large a is gone.
Flow-GRPO's implementation of CPS scores it by -(x_{s'} - mu)^2 without the Gaussian's 1 / (2 std^2)
and normalising terms; here both variants use the full Gaussian log-density, as the DDIM step does.

In both variants x_{s'} | x_s ~ N(mu, std^2 I) with mu = c_x x_s + c_v v, and a = 0 is the ODE step.
"""

from __future__ import annotations

import math

import torch

from loop_ray.diffusion.gaussian import gaussian_transition
from loop_ray.diffusion.kinds import SDE_KINDS


def _rows(value, batch: int) -> torch.Tensor:
    """A python number, 0-d or [B] tensor as a float64 CPU tensor of shape [B]."""
    return torch.as_tensor(value, dtype=torch.float64, device="cpu").expand(batch).clone()


def flow_step_coefficients(
    sigmas: torch.Tensor,
    step_index: int | torch.Tensor,
    noise_level: float | torch.Tensor,
    sde: str = "sde",
    batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_x, c_v, std), each float64 [B]: mu = c_x x_s + c_v v and the step's noise std, for the step
    s = sigmas[j] -> s' = sigmas[j + 1] of each row (j = step_index, an int or [B] tensor) at noise
    level a = noise_level (a number or [B] tensor; a = 0 gives the ODE step and std = 0)."""
    if sde not in SDE_KINDS:
        raise ValueError(f"sde={sde!r}: expected one of {SDE_KINDS}")
    schedule = torch.as_tensor(sigmas).to(device="cpu", dtype=torch.float64)
    j = torch.as_tensor(step_index, dtype=torch.long, device="cpu")
    if batch is None:
        batch = j.numel() if j.dim() else torch.as_tensor(noise_level).numel()
    j = j.expand(batch).clone()
    if (j < 0).any() or (j >= len(schedule) - 1).any():
        raise ValueError(f"step index out of range for a schedule of {len(schedule) - 1} steps: {j.tolist()}")
    a = _rows(noise_level, batch)
    if (a < 0).any():
        raise ValueError(f"noise level a must be >= 0, got {a.tolist()}")
    s, s_next = schedule[j], schedule[j + 1]
    dt = s_next - s  # < 0
    if sde == "sde":
        denominator = 1 - torch.where(s >= 1, schedule[1].expand_as(s), s)  # Flow-GRPO's guard at s = 1
        sigma = a * (s / denominator).sqrt()
        correction = torch.where(s > 0, sigma**2 / (2 * s.clamp(min=1e-300)), torch.zeros_like(s))
        c_x = 1 + correction * dt
        c_v = (1 + correction * (1 - s)) * dt
        std = sigma * (-dt).clamp(min=0).sqrt()
    else:
        std = s_next * torch.sin(a.clamp(max=1.0) * math.pi / 2)
        keep = (s_next**2 - std**2).clamp(min=0).sqrt()  # = s' cos(a pi / 2)
        c_x = (1 - s_next) + keep
        c_v = -(1 - s_next) * s + keep * (1 - s)
    return c_x, c_v, std


def flow_step_with_logprob(
    v: torch.Tensor,
    sample: torch.Tensor,
    sigmas: torch.Tensor,
    step_index: int | torch.Tensor,
    noise_level: float | torch.Tensor = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    *,
    noise: torch.Tensor | None = None,
    sde: str = "sde",
    reduce: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step x_s -> x_{s'} of the flow sampler (module docstring) and log N(x_{s'}; mu, std^2 I).

    v: the (guided) velocity at x_s, [B, ...]; sample: x_s, [B, ...] (any layout, packed or not: the
        step is elementwise and the reduction covers every non-batch dimension).
    sigmas: the scheduler's noise levels after `set_timesteps`, [T + 1] ending in 0 (shift applied).
    step_index: j, an int or a [B] tensor; the step goes from sigmas[j] to sigmas[j + 1].
    noise_level: a, a number or a [B] tensor (a row with a = 0 takes the deterministic ODE step).
    prev_sample: the x_{s'} to score; None draws x_{s'} = mu + std z with z given as `noise` or drawn
        from `generator` (one generator, or a list of one per row, see `logprob.draw_noise`).
    sde: "sde" (Flow-GRPO) or "cps" (Flow-CPS).
    reduce: "mean" over all non-batch dimensions (DDPO's and Flow-GRPO's convention) or "sum".

    Returns (prev_sample in the dtype of `sample`, log_prob [B]). The maths runs in float32, or float64
    when `sample` or `v` is float64; the scalar coefficients are formed in float64. Where std = 0 the
    step is deterministic: x_{s'} = mu, log_prob 0 and its gradient 0, never NaN. Gradients flow
    through mu into `v`; a given `prev_sample` is treated as data.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce={reduce!r}: expected 'mean' or 'sum'")
    dtype = torch.promote_types(torch.promote_types(sample.dtype, v.dtype), torch.float32)
    device, batch = sample.device, sample.shape[0]
    x = sample.to(dtype)
    v = v.to(dtype)
    per_row = (batch,) + (1,) * (x.dim() - 1)
    c_x, c_v, std = (
        c.to(device=device, dtype=dtype).reshape(per_row)
        for c in flow_step_coefficients(sigmas, step_index, noise_level, sde, batch)
    )
    mu = c_x * x + c_v * v
    prev_sample, log_prob = gaussian_transition(mu, std, prev_sample, noise, generator, reduce)
    return prev_sample.to(sample.dtype), log_prob
