"""The flow SDE / CPS step with log-prob against diffusers' FlowMatchEulerDiscreteScheduler.step,
torch.distributions, finite differences and a Gaussian toy whose exact velocity is known."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from numerics import UNIT_ROUNDOFF

from loop_ray.diffusion.flow.logprob import flow_step_coefficients, flow_step_with_logprob

torch.set_num_threads(1)

SHAPE = (3, 4, 6, 6)


def shifted_scheduler(num_steps, dynamic=False):
    """SD3.5's schedule (static shift 3.0), or FLUX.1's (resolution-dependent shift, mu for 1024
    image tokens, and the pipeline's own sigmas 1 ... 1/T)."""
    if not dynamic:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(num_steps)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15)
        sigmas = [1.0 - i * (1.0 - 1.0 / num_steps) / max(num_steps - 1, 1) for i in range(num_steps)]
        scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256))
    return scheduler


def reference_mean_std(v, x, s, s_next, a, sde, s_1):
    """mu and std written out from the papers' equations (float64), independently of the module."""
    if sde == "sde":
        sigma = a * math.sqrt(s / (1 - (s_1 if s == 1 else s)))
        dt = s_next - s
        mean = x + (v + sigma**2 / (2 * s) * (x + (1 - s) * v)) * dt
        return mean, sigma * math.sqrt(-dt)
    std = s_next * math.sin(a * math.pi / 2)
    x0_hat, eps_hat = x - s * v, x + (1 - s) * v
    return (1 - s_next) * x0_hat + math.sqrt(s_next**2 - std**2) * eps_hat, std


@pytest.mark.parametrize("sde", ["sde", "cps"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_noise_level_zero_is_the_schedulers_euler_step(sde, dynamic):
    scheduler = shifted_scheduler(10, dynamic)
    sigmas = scheduler.sigmas
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == 11
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen)
    for j, t in enumerate(scheduler.timesteps):
        v = torch.randn(SHAPE, generator=gen)
        expected = scheduler.step(v, t, x).prev_sample
        ours, logp = flow_step_with_logprob(v, x, sigmas, j, noise_level=0.0, sde=sde,
                                            generator=torch.Generator().manual_seed(j))
        # the same float32 ops for "sde" (x + dt v); "cps" forms c_x = 1, c_v = dt in float64 first
        atol = 4 * UNIT_ROUNDOFF * float(x.abs().max() + v.abs().max())
        torch.testing.assert_close(ours, expected, rtol=0, atol=atol)
        assert torch.equal(logp, torch.zeros(SHAPE[0]))
        x = expected


@pytest.mark.parametrize("sde, a", [("sde", 0.7), ("sde", 1.0), ("cps", 0.8), ("cps", 0.3)])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_equals_normal_density_float64(sde, a, reduce):
    scheduler = shifted_scheduler(8)
    sigmas = scheduler.sigmas
    s_1 = float(sigmas[1])
    gen = torch.Generator().manual_seed(1)
    for j in range(8):
        x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        v = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        s, s_next = float(sigmas[j]), float(sigmas[j + 1])
        mean, std = reference_mean_std(v, x, s, s_next, a, sde, s_1)
        # a sampled step is mu + std z with z from the row's generator
        prev, logp_drawn = flow_step_with_logprob(v, x, sigmas, j, a, sde=sde, reduce=reduce,
                                                  generator=[torch.Generator().manual_seed(10 + r) for r in range(3)])
        z = torch.stack([torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(10 + r), dtype=torch.float64)
                         for r in range(3)])
        if std == 0:  # CPS's last step
            assert sde == "cps" and j == 7
            torch.testing.assert_close(prev, mean, rtol=0, atol=1e-12)
            assert torch.equal(logp_drawn, torch.zeros(3))
            continue
        torch.testing.assert_close(prev, mean + std * z, rtol=0, atol=1e-12)
        # the log-prob of any given x_{s'} is the Normal's log-density
        target = prev + 0.3 * torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        _, logp = flow_step_with_logprob(v, x, sigmas, j, a, prev_sample=target, sde=sde, reduce=reduce)
        density = torch.distributions.Normal(mean, std).log_prob(target).flatten(1)
        expected = density.mean(1) if reduce == "mean" else density.sum(1)
        torch.testing.assert_close(logp, expected, rtol=1e-12, atol=1e-10)
        assert logp.dtype == torch.float64 and logp.shape == (3,)


def test_first_step_at_pure_noise_uses_the_schedules_second_level():
    """s_0 = 1: sigma_s = a sqrt(s / (1 - s)) is infinite; with 1 - s_1 in the denominator (Flow-GRPO)
    the step's std is a sqrt(1 / (1 - s_1)) sqrt(1 - s_1) = a exactly, and everything is finite."""
    sigmas = shifted_scheduler(10).sigmas
    c_x, c_v, std = flow_step_coefficients(sigmas, 0, 0.7, "sde", batch=2)
    assert torch.allclose(std, torch.full((2,), 0.7, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.isfinite(c_x).all() and torch.isfinite(c_v).all()
    _, c_v_cps, std_cps = flow_step_coefficients(sigmas, 0, 0.7, "cps", batch=2)
    assert torch.isfinite(c_v_cps).all() and (std_cps > 0).all()


def _directional(sde, a, j, sigmas, seed):
    """(autograd d logp / d v . u, central finite difference along u), float64, h = 1e-5."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    v = torch.randn(SHAPE, generator=gen, dtype=torch.float64, requires_grad=True)
    prev, _ = flow_step_with_logprob(v.detach(), x, sigmas, j, a, sde=sde, generator=gen)
    prev = prev + 0.05 * torch.randn(SHAPE, generator=gen, dtype=torch.float64)  # off the mean: a non-zero gradient
    u = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    u = u / u.norm()
    _, logp = flow_step_with_logprob(v, x, sigmas, j, a, prev_sample=prev, sde=sde)
    (grad,) = torch.autograd.grad(logp.sum(), v)
    h = 1e-5
    with torch.no_grad():
        up = flow_step_with_logprob(v + h * u, x, sigmas, j, a, prev_sample=prev, sde=sde)[1].sum()
        down = flow_step_with_logprob(v - h * u, x, sigmas, j, a, prev_sample=prev, sde=sde)[1].sum()
    return float((grad * u).sum()), float((up - down) / (2 * h))


@pytest.mark.parametrize("sde, a", [("sde", 0.7), ("cps", 0.8)])
@pytest.mark.parametrize("j", [0, 5, 8])  # early (s = 1), middle, late (CPS: the last stochastic step)
def test_gradient_wrt_velocity_matches_finite_differences(sde, a, j):
    sigmas = shifted_scheduler(10).sigmas
    autograd, finite_difference = _directional(sde, a, j, sigmas, seed=j)
    assert abs(autograd) > 1e-6
    # log p is quadratic in v, so the central difference is exact up to float64 rounding of logp / h
    assert autograd == pytest.approx(finite_difference, rel=1e-6)


def test_deterministic_steps_score_zero_with_zero_gradient():
    sigmas = shifted_scheduler(6).sigmas
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=gen)
    cases = [("sde", 0.0, 2), ("cps", 0.0, 2), ("cps", 0.8, 5)]  # a = 0, and CPS's last step (s' = 0)
    for sde, a, j in cases:
        v = torch.randn(SHAPE, generator=gen, requires_grad=True)
        _, logp = flow_step_with_logprob(v, x, sigmas, j, a, prev_sample=x + 1.0, sde=sde)
        logp.sum().backward()
        assert torch.equal(logp.detach(), torch.zeros(SHAPE[0]))
        assert torch.equal(v.grad, torch.zeros(SHAPE))
    # a per-row noise level: rows with a = 0 are deterministic, the others are not (the SDE window)
    v = torch.randn(SHAPE, generator=gen)
    a = torch.tensor([0.7, 0.0, 0.7])
    prev, logp = flow_step_with_logprob(v, x, sigmas, 2, a, generator=gen)
    ode, _ = flow_step_with_logprob(v, x, sigmas, 2, 0.0)
    assert torch.equal(prev[1], ode[1]) and logp[1] == 0 and (logp[[0, 2]] != 0).all()
    assert not torch.allclose(prev[0], ode[0])


def test_per_row_steps_match_single_steps():
    sigmas = shifted_scheduler(10).sigmas
    j = torch.tensor([0, 3, 9])
    gen = torch.Generator().manual_seed(4)
    x, v = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    prev, logp = flow_step_with_logprob(v, x, sigmas, j, 0.7, generator=[torch.Generator().manual_seed(i)
                                                                         for i in range(3)])
    for r in range(3):
        one, logp_one = flow_step_with_logprob(v[r:r + 1], x[r:r + 1], sigmas, int(j[r]), 0.7,
                                               generator=[torch.Generator().manual_seed(r)])
        torch.testing.assert_close(prev[r:r + 1], one, rtol=0, atol=0)  # elementwise IEEE ops: exact
        atol = math.sqrt(one[0].numel()) * UNIT_ROUNDOFF * (float(logp.abs().max()) + 1.0)
        torch.testing.assert_close(logp[r:r + 1], logp_one, rtol=0, atol=atol)


@pytest.mark.parametrize("a", [0.0, 0.7, 1.0])
def test_the_sde_keeps_the_flows_marginals(a):
    """x_0 ~ N(0, c^2) in 1-D has the exact velocity v(x, s) = (s - (1 - s) c^2) / var_s x with
    var_s = (1 - s)^2 c^2 + s^2. The SDE has the ODE's marginals whatever a: 100 steps end at
    variance c^2 up to Euler's discretisation (3 % at a = 0). Without the score correction the same
    noise would end far above it."""
    c2, n, steps = 0.25, 50_000, 100
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    uncorrected = x.clone()
    for j in range(steps):
        s, s_next = float(sigmas[j]), float(sigmas[j + 1])
        velocity = (s - (1 - s) * c2) / ((1 - s) ** 2 * c2 + s**2)
        state = gen.get_state()
        x, _ = flow_step_with_logprob(velocity * x, x, sigmas, j, a, generator=gen)
        gen.set_state(state)
        std = flow_step_coefficients(sigmas, j, a, "sde", batch=1)[2]
        uncorrected = uncorrected + (s_next - s) * velocity * uncorrected + std * torch.randn(n, 1, generator=gen,
                                                                                           dtype=torch.float64)
    assert float(x.var()) == pytest.approx(c2, rel=0.04)
    assert abs(float(x.mean())) < 0.01
    if a > 0:
        assert float(uncorrected.var()) > 2 * c2


def test_cps_keeps_the_interpolation_coefficients():
    """Data at one point m: the exact velocity gives x0_hat = m and eps_hat = the true noise, and every
    CPS step lands on x_{s'} ~ N((1 - s') m, s'^2), the interpolation's own law at s' (a = 0.8)."""
    m, n = 1.5, 50_000
    sigmas = shifted_scheduler(10).sigmas.double()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    for j in range(10):
        s, s_next = float(sigmas[j]), float(sigmas[j + 1])
        v = (x - m) / s  # eps - x_0 with eps = (x - (1 - s) m) / s
        x, _ = flow_step_with_logprob(v, x, sigmas, j, 0.8, sde="cps", generator=gen)
        assert float(x.mean()) == pytest.approx((1 - s_next) * m, abs=0.02)
        assert float(x.std()) == pytest.approx(s_next, rel=0.02, abs=1e-12)
