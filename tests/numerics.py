"""Float32 tolerances derived from the arithmetic, for tests that compare one computation done two ways.

Two float32 runs of the same network that differ only in batch composition (or chunking) can take
different CPU kernels (PyTorch picks AVX-512, AVX2 or plain loops at run time, and a batch of another
size may tile a reduction differently), so their reductions add the same terms in another order.
That changes the result by rounding, not by maths, and the bound below says by how much:

- A sum of n terms, each of magnitude <= s, rounded in float32 has a relative error of about
  sqrt(n) * u, u = 2^-24 the unit roundoff (the probabilistic bound of Higham & Mary, "A new approach
  to probabilistic rounding error analysis", SISC 2019; the worst case n * u is far too pessimistic
  for sums in random order).
- A network is L such reductions in a row; with normalisation layers keeping activations at scale,
  their independent errors add in quadrature: relative error ~ sqrt(L * n) * u.
- Classifier-free guidance forms (1 + w) * eps_c - w * eps_u, so the two evaluations' errors add with
  weight 1 + 2w; T sampler steps add T such errors (the DDIM update keeps latents at scale).

Hence `sampler_atol` = T * (1 + 2w) * sqrt(L * n) * u * s with s the RMS of the compared values.
Every test that uses it also checks that a real bug (another seed, another prompt) moves the result
by orders of magnitude more, so the tolerance still catches a batch-dependence bug.
"""

from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = 2.0**-24  # float32: half the machine epsilon torch.finfo(torch.float32).eps


def reductions(module: torch.nn.Module) -> tuple[int, int]:
    """(n, L): the longest reduction of one output element of any Conv/Linear layer (input channels
    per group x kernel size, or input features), and how many such layers the module has."""
    longest, layers = 1, 0
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            longest = max(longest, m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
            layers += 1
        elif isinstance(m, torch.nn.Linear):
            longest = max(longest, m.in_features)
            layers += 1
    return longest, max(layers, 1)


def network_rel_error(module: torch.nn.Module) -> float:
    """Relative rounding error of one float32 forward of `module`: sqrt(L * n) * u."""
    n, layers = reductions(module)
    return math.sqrt(layers * n) * UNIT_ROUNDOFF


def sampler_atol(module: torch.nn.Module, values: torch.Tensor, num_steps: int, guidance_scale: float) -> float:
    """Absolute tolerance between two float32 samplings of the same (prompt, seed, weights) that
    differ only in batch composition: T * (1 + 2w) * sqrt(L * n) * u * RMS(values)."""
    cfg_gain = 1.0 + 2.0 * guidance_scale if guidance_scale != 1.0 else 1.0
    scale = float(values.double().pow(2).mean().sqrt())
    return num_steps * cfg_gain * network_rel_error(module) * scale


def logprob_atol(values: torch.Tensor, sigma_min: float, dims: int) -> float:
    """Absolute tolerance of a stored per-step log-prob (DDPO's mean over `dims` latent dimensions)
    between two such samplings. The step computes x' = mu + sigma z and then z' = (x' - mu) / sigma
    from the same mu, so errors in mu cancel; what is left is the rounding of that add and subtract,
    |z' - z| <= 4u max|x| / sigma, which moves the mean of z'^2 / 2 by at most mean|z| (< 1) times that;
    plus the rounding of the mean over `dims` terms of magnitude ~ max(1, |log sigma_min|)."""
    scale = float(values.double().abs().max())
    return 4 * UNIT_ROUNDOFF * scale / sigma_min + math.sqrt(dims) * UNIT_ROUNDOFF * max(
        1.0, abs(math.log(sigma_min))
    )


def directional_derivative(policy, batch, j: int, h: float) -> tuple[float, float]:
    """(autograd d log p / d theta . v, its central finite difference (f(theta + h v) - f(theta - h v)) / 2h)
    for the log-prob of stored step j, v a unit random direction over the trainable weights seeded by j.
    The finite difference's O(h^2) error and its rounding (~ eps / h) set the h to use; in float64
    both stay far below the agreement the tests ask for."""
    params = policy.trainable_parameters()
    gen = torch.Generator().manual_seed(j)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    norm = torch.sqrt(sum((v**2).sum() for v in direction))
    direction = [v / norm for v in direction]
    step = torch.tensor([j])
    grads = torch.autograd.grad(policy.log_prob(batch, step).sum(), params)
    autograd = sum((g * v).sum() for g, v in zip(grads, direction)).item()
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            for p, v in zip(params, direction):
                p.add_(sign * h * v)
            values.append(policy.log_prob(batch, step).item())
            for p, v in zip(params, direction):
                p.sub_(sign * h * v)
    return autograd, (values[0] - values[1]) / (2 * h)
