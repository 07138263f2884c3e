"""One stochastic DDIM step and the Gaussian log-density of its result.

The same function draws x_{t-1} while sampling and scores a stored x_{t-1} while learning, so the
behaviour log-prob logp_old and the recomputed log-prob share every operation.

Notation of DDIM (Song, Meng & Ermon 2021, arXiv 2010.02502), with abar_t = prod_{s<=t} (1 - beta_s):

    x0_pred  = (x_t - sqrt(1 - abar_t) * eps_theta(x_t)) / sqrt(abar_t)                  "predicted x_0"
    sigma_t  = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)      (eq. 16)
    mu_t     = sqrt(abar_prev) * x0_pred + sqrt(1 - abar_prev - sigma_t^2) * eps_theta       (eq. 12)
    x_{t-1}  = mu_t + sigma_t * z,   z ~ N(0, I)                                             (eq. 12)

so x_{t-1} | x_t ~ N(mu_t, sigma_t^2 I), whose log-density is the policy's per-step log-prob.
"""

from __future__ import annotations

import torch

from loop_ray.diffusion.gaussian import gaussian_transition


def alphas_at(scheduler, timestep: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(abar_t, abar_prev) in float64 for a scheduler timestep (int, 0-d or [B] tensor).

    The previous timestep is t - num_train_timesteps // num_inference_steps, exactly as diffusers'
    DDIMScheduler.step takes it, so the policy follows the scheduler's own `timestep_spacing` and
    `steps_offset` (which fix `scheduler.timesteps`). Below timestep 0 the scheduler's
    `final_alpha_cumprod` is used: 1 with `set_alpha_to_one=True`, else abar_0.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before a DDIM step")
    t = torch.as_tensor(timestep, dtype=torch.long, device="cpu")
    t_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = scheduler.alphas_cumprod.to(device="cpu", dtype=torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    abar_t = alphas_cumprod[t]
    abar_prev = torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)], final)
    return abar_t, abar_prev


def ddim_sigma(scheduler, timestep: int | torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t(eta) of DDIM eq. 16 in float64 (0-d, or [B] for a batch of timesteps)."""
    abar_t, abar_prev = alphas_at(scheduler, timestep)
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    return eta * variance.clamp(min=0).sqrt()


def _predict_x0_and_eps(scheduler, model_output, x_t, sqrt_abar_t, sqrt_one_minus_abar_t):
    """Predicted x_0 and eps from the network output, by the scheduler's `prediction_type`."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        eps = model_output
        x0_pred = (x_t - sqrt_one_minus_abar_t * eps) / sqrt_abar_t
    elif kind == "v_prediction":  # v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022)
        x0_pred = sqrt_abar_t * x_t - sqrt_one_minus_abar_t * model_output
        eps = sqrt_abar_t * model_output + sqrt_one_minus_abar_t * x_t
    elif kind == "sample":
        x0_pred = model_output
        eps = (x_t - sqrt_abar_t * x0_pred) / sqrt_one_minus_abar_t
    else:
        raise ValueError(f"prediction_type {kind!r}: expected epsilon, v_prediction or sample")
    return x0_pred, eps


def _clip_x0(scheduler, x0_pred: torch.Tensor) -> torch.Tensor:
    """The scheduler's clipping of predicted x_0: dynamic thresholding (Saharia et al. 2022, the
    per-sample `dynamic_thresholding_ratio` quantile s of |x_0| clamped to [1, sample_max_value];
    x_0 <- clamp(x_0, -s, s) / s) or plain clipping to +-clip_sample_range."""
    cfg = scheduler.config
    if cfg.thresholding:
        flat = x0_pred.flatten(1)
        s = torch.quantile(flat.abs(), cfg.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=cfg.sample_max_value).view(-1, *[1] * (x0_pred.dim() - 1))
        return torch.maximum(torch.minimum(x0_pred, s), -s) / s
    if cfg.clip_sample:
        return x0_pred.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    return x0_pred


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    *,
    noise: torch.Tensor | None = None,
    reduce: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} (DDIM eq. 12, sigma_t of eq. 16) and log N(x_{t-1}; mu_t, sigma_t^2 I).

    scheduler: a diffusers DDIMScheduler after `set_timesteps`; its `prediction_type` (epsilon,
        v_prediction, sample), `clip_sample`/`thresholding`, `set_alpha_to_one` and timestep
        layout are honoured as in `DDIMScheduler.step`.
    model_output: the (guided) network output at x_t, [B, ...]. `sample` is x_t, [B, ...].
    timestep: t as a python int, a 0-d tensor, or a [B] tensor of one timestep per sample.
    prev_sample: the x_{t-1} to score; None draws x_{t-1} = mu_t + sigma_t * z with z given as
        `noise` or drawn from `generator` (one generator, or a list of one per batch row).
    reduce: "mean" averages the log-density over all non-batch dimensions (DDPO's convention, which
        the paper's clip range eps = 1e-4 assumes); "sum" gives the full log-density.

    Returns (prev_sample in the dtype of `sample`, log_prob [B]). The maths runs in float32, or in
    float64 when `sample` or `model_output` is float64. Where sigma_t = 0 (eta = 0, or the last step with
    set_alpha_to_one) the step is deterministic: x_{t-1} = mu_t and log_prob is 0, so such a step
    adds nothing to the loss and its gradient is 0, never NaN. Gradients flow through mu_t into
    `model_output`; a given `prev_sample` is treated as data.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce={reduce!r}: expected 'mean' or 'sum'")
    dtype = torch.promote_types(torch.promote_types(sample.dtype, model_output.dtype), torch.float32)
    device = sample.device
    x_t = sample.to(dtype)
    model_output = model_output.to(dtype)
    batch = x_t.shape[0]
    per_sample = (batch,) + (1,) * (x_t.dim() - 1)

    # Scalar coefficients of each row in float64 (1 - abar_prev - sigma_t^2 cancels badly in float32),
    # then cast and shaped [B, 1, ...] to broadcast over the sample.
    abar_t, abar_prev = alphas_at(scheduler, timestep)
    sigma_t = ddim_sigma(scheduler, timestep, eta)
    coefficients = (
        abar_t.sqrt(),
        (1 - abar_t).sqrt(),
        abar_prev.sqrt(),
        (1 - abar_prev - sigma_t**2).clamp(min=0).sqrt(),
        sigma_t,
    )
    sqrt_abar_t, sqrt_one_minus_abar_t, sqrt_abar_prev, direction_coefficient, sigma_t = (
        c.to(device=device, dtype=dtype).expand(batch).reshape(per_sample) for c in coefficients
    )

    x0_pred, eps = _predict_x0_and_eps(scheduler, model_output, x_t, sqrt_abar_t, sqrt_one_minus_abar_t)
    x0_pred = _clip_x0(scheduler, x0_pred)
    direction = direction_coefficient * eps  # "direction pointing to x_t"
    mu_t = sqrt_abar_prev * x0_pred + direction

    prev_sample, log_prob = gaussian_transition(mu_t, sigma_t, prev_sample, noise, generator, reduce)
    return prev_sample.to(sample.dtype), log_prob
