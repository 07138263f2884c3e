"""The Gaussian transition x' ~ N(mu, sigma^2 I) that both model families' sampler steps end in,
and the seeded noise it draws (one generator per batch row keeps a row independent of its batch)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def draw_noise(
    shape: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of `shape`; with a list of generators row i comes from generator[i].

    Noise is drawn on each generator's own device (the CPU for CPU generators) and then moved, so a
    seeded row is the same whatever device the model runs on and whatever rows share its batch.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.stack(rows).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def gaussian_transition(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    reduce: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian transition x' ~ N(mu, sigma^2 I) that every sampler step ends in (DDIM here, the
    flow SDE / CPS steps in flow/logprob): draws x' = mu + sigma z (z given as `noise` or drawn from
    `generator`) unless `prev_sample` is given, and returns (x' detached, log N(x'; mu, sigma^2 I))
    reduced over the non-batch dimensions by `reduce` ("mean": DDPO's convention; "sum"). sigma is
    [B, 1, ...]; rows with sigma = 0 are deterministic and get log-prob 0 (and gradient 0, never NaN)."""
    if prev_sample is None:
        z = draw_noise(mu.shape, generator, mu.device, mu.dtype) if noise is None else noise.to(mu.device, mu.dtype)
        prev_sample = mu + sigma * z
    prev_sample = prev_sample.detach().to(mu.dtype)
    stochastic = sigma > 0
    safe_sigma = torch.where(stochastic, sigma, torch.ones_like(sigma))
    log_density = -((prev_sample - mu) ** 2) / (2 * safe_sigma**2) - safe_sigma.log() - _LOG_SQRT_2PI
    log_density = torch.where(stochastic, log_density, torch.zeros_like(log_density))
    dims = tuple(range(1, mu.dim()))
    log_prob = log_density.mean(dim=dims) if reduce == "mean" else log_density.sum(dim=dims)
    return prev_sample, log_prob
