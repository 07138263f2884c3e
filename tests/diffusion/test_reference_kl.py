"""The KL penalty to the reference policy (`algorithm.kl_beta`): its value against diffusers' own
DDIM step, its gradient, and what it does to an update."""

import copy

import pytest
import torch

from loop_ray.config import config_from_dict
from loop_ray.diffusion.ddim.policy import DDIMPolicy
from loop_ray.diffusion.ddim.tiny import tiny_sd_components
from loop_ray.training.torch_engine import TorchEngine
from loop_ray.training.update import update_on_shard

torch.set_num_threads(1)

PROMPTS = ["a red circle", "a blue square"]
T, K = 4, 2
SEEDS = [3, 4, 5, 6]


def _policy():
    return DDIMPolicy(tiny_sd_components(), num_steps=T, guidance_scale=2.0)


def _perturb(module, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))


def _diffusers_mean_and_std(policy, network, batch, steps):
    """mu_t and sigma_t of each stored transition by diffusers' DDIMScheduler.step (eta = 1, zero
    variance noise), with `network` as the UNet: the independent reference."""
    scheduler = copy.deepcopy(policy.scheduler)
    rows = torch.arange(len(batch))
    x_t = batch.latents[rows, steps]
    cond = batch.conditioning()
    saved, policy.unet = policy.unet, network
    try:
        with torch.no_grad():
            means, stds = [], []
            for i in range(len(batch)):
                t = policy.timesteps[steps[i]]
                eps = policy.guided_output(x_t[i : i + 1], t.view(1), cond["prompt_embeds"][i : i + 1],
                                           cond["negative_embeds"][i : i + 1])
                out = scheduler.step(eps, t, x_t[i : i + 1], eta=1.0, variance_noise=torch.zeros_like(eps))
                prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
                means.append(out.prev_sample[0].double())
                stds.append(float(scheduler._get_variance(t, prev_t)) ** 0.5)
    finally:
        policy.unet = saved
    return torch.stack(means), torch.tensor(stds, dtype=torch.float64)


def test_kl_is_the_closed_form_gaussian_kl_of_diffusers_ddim_means():
    policy = _policy()
    batch = policy.sample(PROMPTS, K, SEEDS)
    policy.keep_reference()
    reference = copy.deepcopy(policy.unet)
    steps = torch.tensor([0, 1, 2, 3])

    logp, kl = policy.log_prob_and_reference_kl(batch, steps)
    assert torch.equal(kl, torch.zeros_like(kl))  # the same weights: the same mean, bit for bit
    assert torch.equal(logp, policy.log_prob(batch, steps))

    _perturb(policy.unet, 0.05, seed=0)
    logp, kl = policy.log_prob_and_reference_kl(batch, steps)
    assert torch.equal(logp.detach(), policy.log_prob(batch, steps).detach())
    mu_ref, sigma = _diffusers_mean_and_std(policy, reference, batch, steps)
    mu, sigma_again = _diffusers_mean_and_std(policy, policy.unet, batch, steps)
    assert torch.equal(sigma, sigma_again)
    expected = ((mu - mu_ref) ** 2).flatten(1).mean(1) / (2 * sigma**2)
    # The value is log p_ref(mu_ref) - log p_theta(mu_ref): a difference of two float32 log-densities
    # of size |c| = |log sigma| + 0.92 each, so it carries ~4u|c| of rounding, plus diffusers' float32
    # means, whose rounding (u * |mu| / sigma per dim, squared with the signal) is far smaller.
    c = sigma.log().abs() + 0.92
    tol = 4 * 2**-24 * c + 1e-3 * expected
    assert (expected > 100 * tol).all()  # the perturbation is visible above the rounding
    assert ((kl.double() - expected).abs() <= tol).all()


def test_kl_gradient_reaches_only_the_trained_weights_and_vanishes_at_the_reference():
    policy = _policy()
    batch = policy.sample(PROMPTS, K, SEEDS)
    policy.keep_reference()
    steps = torch.tensor([1, 1, 2, 2])
    _, kl = policy.log_prob_and_reference_kl(batch, steps)
    kl.sum().backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in policy.unet.parameters())
    policy.unet.zero_grad(set_to_none=True)
    _perturb(policy.unet, 0.05, seed=1)
    _, kl = policy.log_prob_and_reference_kl(batch, steps)
    kl.sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in policy.unet.parameters() if p.grad is not None) > 0
    assert all(not p.requires_grad and p.grad is None for p in policy._reference.parameters())


def test_a_kl_only_update_pulls_the_policy_back_to_the_reference():
    """With zero advantages the loss is beta * KL alone: Adam steps must lower it."""
    policy = _policy()
    batch = policy.sample(PROMPTS, K, SEEDS)
    policy.keep_reference()
    _perturb(policy.unet, 0.05, seed=2)
    steps = torch.tensor([0, 1, 2, 3])
    before = policy.log_prob_and_reference_kl(batch, steps)[1].mean().item()
    cfg = config_from_dict({
        "model": {"kind": "tiny_sd"},
        "sampling": {"num_steps": T, "k": K, "prompts_per_iteration": 2, "guidance_scale": 2.0},
        "algorithm": {"kl_beta": 1.0, "inner_epochs": 10},
        "learner": {"minibatch_size": 4, "lr": 3e-4},
    })
    engine = TorchEngine(cfg, policy.trainable_parameters(), grad_accum_steps=T)
    metrics = update_on_shard(engine, policy, batch, torch.zeros(len(batch)), cfg, torch.Generator().manual_seed(0))
    after = policy.log_prob_and_reference_kl(batch, steps)[1].mean().item()
    assert metrics["kl_ref"] > 0 and after < 0.5 * before


def test_without_a_kept_reference_the_penalty_says_what_to_do():
    policy = _policy()
    batch = policy.sample(PROMPTS[:1], 1, SEEDS[:1])
    with pytest.raises(RuntimeError, match="keep_reference"):
        policy.log_prob_and_reference_kl(batch, torch.tensor([0]))


def test_with_lora_the_reference_is_the_network_with_its_adapters_off():
    """No copy is kept: the KL equals the one against a frozen copy of the base network."""
    from loop_ray.diffusion.lora import add_lora

    policy = _policy()
    base = copy.deepcopy(policy.unet)
    add_lora(policy.unet, rank=2)
    batch = policy.sample(PROMPTS, K, SEEDS)
    policy.keep_reference()
    assert policy._reference == "adapters_off"
    steps = torch.tensor([0, 1, 2, 3])
    assert torch.equal(policy.log_prob_and_reference_kl(batch, steps)[1], torch.zeros(len(batch)))
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    logp, kl = policy.log_prob_and_reference_kl(batch, steps)
    assert torch.equal(logp.detach(), policy.log_prob(batch, steps).detach())  # the adapters are back on

    copied = _policy()  # the same scheduler; the conditioning comes with the batch
    copied.unet = policy.unet
    copied._reference = base.requires_grad_(False)
    assert (kl > 0).all()
    torch.testing.assert_close(kl, copied.log_prob_and_reference_kl(batch, steps)[1], rtol=0, atol=0)


def test_reference_output_is_the_kept_network_and_leaves_the_policy_in_place():
    policy = _policy()
    batch = policy.sample(PROMPTS, K, SEEDS)
    policy.keep_reference()
    kept = copy.deepcopy(policy.unet)
    _perturb(policy.unet, 0.05, seed=1)
    steps = torch.tensor([0, 1, 2, 3])
    x, cond = batch.latents[torch.arange(len(batch)), steps], batch.conditioning()
    current = policy.model_output(x, steps, cond)
    reference = policy.reference_output(x, steps, cond)
    saved, policy.unet = policy.unet, kept
    expected = policy.model_output(x, steps, cond)
    policy.unet = saved
    torch.testing.assert_close(reference, expected, rtol=0, atol=0)
    assert not torch.allclose(reference, current)
    torch.testing.assert_close(policy.model_output(x, steps, cond), current, rtol=0, atol=0)
    assert not reference.requires_grad
