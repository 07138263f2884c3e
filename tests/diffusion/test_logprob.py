"""The DDIM step with log-prob against diffusers' own DDIMScheduler.step and torch.distributions."""

import copy
import math

import pytest
import torch
from diffusers import DDIMScheduler
from numerics import UNIT_ROUNDOFF

from loop_ray.diffusion.ddim.logprob import ddim_sigma, ddim_step_with_logprob

torch.set_num_threads(1)

SHAPE = (3, 4, 6, 6)


def sd_scheduler(num_steps, **overrides):
    config = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "prediction_type": "epsilon",
    }
    config.update(overrides)
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def float64_copy(scheduler):
    """The same scheduler with its alpha-bars in float64: its `step` on float64 tensors is then an exact
    reference (diffusers' float32 step loses up to ~1e-5 at t=1 with prediction_type "sample")."""
    exact = copy.deepcopy(scheduler)
    exact.alphas_cumprod = scheduler.alphas_cumprod.double()
    exact.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return exact


def reference_mean_and_sigma(scheduler, model_output, t, x_t, eta):
    """mu_t and sigma_t from diffusers alone: its step with zero variance noise, its _get_variance."""
    mean = scheduler.step(model_output, t, x_t, eta=eta, variance_noise=torch.zeros_like(x_t)).prev_sample
    t_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    sigma = eta * scheduler._get_variance(t, t_prev) ** 0.5
    return mean, sigma


@pytest.mark.parametrize("num_steps", [10, 50])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sampled_step_equals_diffusers_step(num_steps, set_alpha_to_one, prediction_type):
    scheduler = sd_scheduler(num_steps, set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type)
    exact = float64_copy(scheduler)
    gen = torch.Generator().manual_seed(0)
    for i, t in enumerate(scheduler.timesteps.tolist()):
        x_t = torch.randn(SHAPE, generator=gen)
        model_output = torch.randn(SHAPE, generator=gen)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        expected = exact.step(
            model_output.double(), t, x_t.double(), eta=1.0, variance_noise=z.double()
        ).prev_sample
        prev, logp = ddim_step_with_logprob(
            scheduler, model_output, t, x_t, eta=1.0, generator=torch.Generator().manual_seed(i)
        )
        torch.testing.assert_close(prev, expected.float(), rtol=0, atol=2e-6)
        assert logp.shape == (SHAPE[0],) and logp.dtype == torch.float32 and torch.isfinite(logp).all()
        # float32 diffusers agrees up to its own rounding
        torch.testing.assert_close(
            prev,
            scheduler.step(model_output, t, x_t, eta=1.0, variance_noise=z).prev_sample,
            rtol=0,
            atol=5e-5,
        )
        mean, sigma = reference_mean_and_sigma(exact, model_output.double(), t, x_t.double(), 1.0)
        _, logp64 = ddim_step_with_logprob(
            scheduler, model_output.double(), t, x_t.double(), prev_sample=expected
        )
        if sigma > 0:
            density = torch.distributions.Normal(mean, sigma).log_prob(expected).mean(dim=(1, 2, 3))
            torch.testing.assert_close(logp64, density, rtol=0, atol=1e-10)
        else:  # set_alpha_to_one: the last step is deterministic
            assert set_alpha_to_one and i == num_steps - 1 and torch.equal(logp64, torch.zeros_like(logp64))
        torch.testing.assert_close(logp64, logp.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{"clip_sample": True, "clip_sample_range": 0.5}, {"thresholding": True, "sample_max_value": 3.0}],
)
def test_clipping_of_predicted_x0_follows_the_scheduler(overrides):
    scheduler = sd_scheduler(10, **overrides)
    gen = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps.tolist():
        x_t, model_output = 3 * torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
        z = torch.randn(SHAPE, generator=gen)
        expected = scheduler.step(model_output, t, x_t, eta=1.0, variance_noise=z).prev_sample
        mean, sigma = reference_mean_and_sigma(scheduler, model_output, t, x_t, 1.0)
        prev, _ = ddim_step_with_logprob(scheduler, model_output, t, x_t, prev_sample=mean + sigma * z)
        torch.testing.assert_close(prev, expected, rtol=1e-5, atol=1e-5)
        deterministic, _ = ddim_step_with_logprob(scheduler, model_output, t, x_t, eta=0.0)
        expected = scheduler.step(model_output, t, x_t, eta=0.0).prev_sample
        torch.testing.assert_close(deterministic, expected, rtol=1e-5, atol=1e-5)


def test_batched_timesteps_match_per_sample_steps():
    scheduler = sd_scheduler(20, prediction_type="v_prediction")
    t = scheduler.timesteps[torch.tensor([0, 7, 13, 19])]  # one timestep per sample, first and last included
    gen = torch.Generator().manual_seed(2)
    x_t, model_output = torch.randn(4, 4, 5, 5, generator=gen), torch.randn(4, 4, 5, 5, generator=gen)
    generators = [torch.Generator().manual_seed(100 + i) for i in range(4)]
    prev, logp = ddim_step_with_logprob(scheduler, model_output, t, x_t, generator=generators)
    for i in range(4):
        z = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(100 + i))
        expected = scheduler.step(
            model_output[i : i + 1], int(t[i]), x_t[i : i + 1], eta=1.0, variance_noise=z
        )
        torch.testing.assert_close(prev[i : i + 1], expected.prev_sample, rtol=1e-5, atol=1e-5)
        _, logp_i = ddim_step_with_logprob(
            scheduler, model_output[i : i + 1], t[i], x_t[i : i + 1], prev_sample=prev[i : i + 1]
        )
        torch.testing.assert_close(logp[i : i + 1], logp_i)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_log_prob_equals_normal_density(eta):
    scheduler = sd_scheduler(10)
    gen = torch.Generator().manual_seed(3)
    for t in scheduler.timesteps.tolist():
        x_t, model_output = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
        mean, sigma = reference_mean_and_sigma(scheduler, model_output, t, x_t, eta)
        prev = mean + sigma * torch.randn(SHAPE, generator=gen) + 0.1 * torch.randn(SHAPE, generator=gen)
        density = torch.distributions.Normal(mean, sigma).log_prob(prev)
        _, logp_mean = ddim_step_with_logprob(scheduler, model_output, t, x_t, eta, prev_sample=prev)
        _, logp_sum = ddim_step_with_logprob(
            scheduler, model_output, t, x_t, eta, prev_sample=prev, reduce="sum"
        )
        torch.testing.assert_close(logp_mean, density.mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logp_sum, density.sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-2)


def test_deterministic_steps_give_zero_log_prob_and_finite_gradient():
    scheduler = sd_scheduler(10, set_alpha_to_one=True)
    last = int(scheduler.timesteps[-1])  # abar_prev = 1 there, so sigma_t = 0 even at eta = 1
    assert ddim_sigma(scheduler, last, 1.0) == 0 and ddim_sigma(scheduler, scheduler.timesteps[0], 1.0) > 0
    gen = torch.Generator().manual_seed(4)
    for t, eta in [(int(scheduler.timesteps[0]), 0.0), (int(scheduler.timesteps[4]), 0.0), (last, 1.0)]:
        x_t = torch.randn(SHAPE, generator=gen)
        model_output = torch.randn(SHAPE, generator=gen, requires_grad=True)
        expected = scheduler.step(model_output.detach(), t, x_t, eta=eta, variance_noise=torch.zeros(SHAPE))
        prev, logp = ddim_step_with_logprob(scheduler, model_output, t, x_t, eta, generator=gen)
        torch.testing.assert_close(prev, expected.prev_sample, rtol=1e-5, atol=1e-5)
        assert torch.equal(logp, torch.zeros(SHAPE[0]))
        _, logp = ddim_step_with_logprob(scheduler, model_output, t, x_t, eta, prev_sample=prev + 1.0)
        logp.sum().backward()
        assert torch.equal(logp.detach(), torch.zeros(SHAPE[0]))
        assert torch.equal(model_output.grad, torch.zeros(SHAPE))


def test_per_row_generators_make_rows_independent_of_the_batch():
    scheduler = sd_scheduler(10)
    gen = torch.Generator().manual_seed(5)
    x_t, model_output = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = int(scheduler.timesteps[3])
    prev, logp = ddim_step_with_logprob(
        scheduler, model_output, t, x_t, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    )
    alone, logp_alone = ddim_step_with_logprob(
        scheduler, model_output[1:2], t, x_t[1:2], generator=[torch.Generator().manual_seed(8)]
    )
    # x_{t-1} = mu + sigma z is elementwise IEEE arithmetic (correctly rounded whatever the kernel)
    # on the same noise, so it is exact; the log-prob adds a log and a mean over the row's D terms,
    # which a kernel may round in another order: sqrt(D) * u times the terms' size (tests/numerics.py)
    torch.testing.assert_close(prev[1:2], alone, rtol=0, atol=0)
    terms = float(logp.abs().max()) + 1.0
    atol = math.sqrt(alone[0].numel()) * UNIT_ROUNDOFF * terms
    torch.testing.assert_close(logp[1:2], logp_alone, rtol=0, atol=atol)
    assert not torch.allclose(prev[0], prev[2])
