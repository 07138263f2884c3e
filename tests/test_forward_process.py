"""The forward-process objectives (DiffusionNFT, RWR): hand computations on tiny DDIM and flow
models, the parametrisation identity, the gradient identities, the reward mapping and the control."""

import math

import pytest
import torch

from loop_ray.algorithms import apply_control, compute_advantages
from loop_ray.config import ExperimentConfig
from loop_ray.diffusion.factory import build_policy
from loop_ray.forward_process import (
    adaptive_squared_error,
    ema_update,
    nft_loss,
    noised,
    old_policy_decay,
    optimality_probability,
    predicted_x0,
    rwr_loss,
    rwr_weights,
    target,
)
from loop_ray.training.forward_update import OldPolicy

torch.set_num_threads(1)

PROMPTS = ["a red circle", "a blue square"]


def _policy(kind):
    model = {"kind": kind, "seed": 1} | ({"max_sequence_length": 8} if kind == "tiny_sd3" else {})
    cfg = ExperimentConfig.model_validate({
        "model": model,
        "sampling": {"num_steps": 4, "guidance_scale": 1.0, "eta": 0.0, "flow_noise_level": 0.0},
    })
    return build_policy(cfg), cfg


def _perturb(module, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))


def _inputs(policy, seed=0):
    """Clean samples of the policy (deterministic sampling), one step per sample, noise, x_t."""
    batch = policy.sample(PROMPTS, 2, [11, 12, 13, 14], clean_only=True)
    assert batch.latents.shape[1] == 1 and batch.log_probs.shape == (4, 0)
    x0 = batch.latents[:, -1].double()
    steps = torch.tensor([0, 1, 2, 3])
    alpha, sigma = policy.forward_coefficients(steps)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return batch, x0, steps, alpha, sigma, noise


def _x0_by_hand(kind, out_i, x_t, alpha, sigma, i):
    """x0_hat of sample i from its output `out_i`, written out from the model family's definition."""
    if kind == "tiny_sd":  # eps-prediction: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        return (x_t[i] - float(sigma[i]) * out_i) / float(alpha[i])
    s = float(sigma[i])  # rectified flow: x_t = (1 - s) x0 + s eps, v = eps - x0
    return x_t[i] - s * out_i


@pytest.mark.parametrize("kind", ["tiny_sd", "tiny_sd3"])
def test_nft_loss_matches_a_hand_computation_on_a_tiny_model(kind):
    policy, _ = _policy(kind)
    batch, x0, steps, alpha, sigma, noise = _inputs(policy)
    if kind == "tiny_sd":  # diffusers' own forward process as the reference for x_t
        x_t_ref = policy.scheduler.add_noise(x0, noise, policy.timesteps[steps])
    else:
        x_t_ref = torch.stack([(1 - policy.schedule[j]) * x0[i] + policy.schedule[j] * noise[i]
                               for i, j in enumerate(steps.tolist())]).double()
    x_t = noised(x0, noise, alpha, sigma)
    torch.testing.assert_close(x_t, x_t_ref, rtol=0, atol=1e-6)
    cond = batch.conditioning()
    with torch.no_grad():
        out_old = policy._model_output(x_t.float(), steps, cond).double()
        _perturb(policy._module(), 0.05, seed=3)
        out = policy._model_output(x_t.float(), steps, cond).double()
    assert (out - out_old).abs().max() > 1e-3  # the two policies differ
    r = torch.tensor([0.9, 0.1, 0.5, 0.7], dtype=torch.float64)
    beta = 0.3
    terms, metrics = nft_loss(out, out_old, x_t, x0, alpha, sigma, r, beta, policy.parametrisation)
    for i in range(4):
        pos = (1 - beta) * out_old[i] + beta * out[i]
        neg = (1 + beta) * out_old[i] - beta * out[i]
        e_pos = _x0_by_hand(kind, pos, x_t, alpha, sigma, i) - x0[i]
        e_neg = _x0_by_hand(kind, neg, x_t, alpha, sigma, i) - x0[i]
        l_pos = (e_pos**2).mean() / max(e_pos.abs().mean(), 1e-5)
        l_neg = (e_neg**2).mean() / max(e_neg.abs().mean(), 1e-5)
        expected = (r[i] * l_pos + (1 - r[i]) * l_neg) / beta
        assert math.isclose(float(terms[i]), float(expected), rel_tol=1e-12)
    assert metrics["old_deviation"] > 0


def test_velocity_and_eps_parametrisations_give_the_same_loss():
    """A flow model's velocity output written as an eps-predictor (eps_hat = x_t + (1 - s) v) has the
    same x0_hat, so the same NFT loss; native squared errors differ by the factor b^2."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g,
                                                                                       dtype=torch.float64)
    s = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    alpha, sigma = 1 - s, s
    x_t = noised(x0, noise, alpha, sigma)
    v_theta = target(x0, noise, alpha, sigma, "velocity") + 0.3 * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    v_old = v_theta + 0.2 * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    to_eps = lambda v: x_t + (1 - s).view(-1, 1, 1, 1) * v
    r = torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64)
    for adaptive in (True, False):
        a, _ = nft_loss(v_theta, v_old, x_t, x0, alpha, sigma, r, 0.5, "velocity", adaptive)
        b, _ = nft_loss(to_eps(v_theta), to_eps(v_old), x_t, x0, alpha, sigma, r, 0.5, "epsilon", adaptive)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    # ||x0_hat - x0||^2 = b^2 ||o - o*||^2 in every parametrisation (b of the module docstring)
    abar = torch.tensor([0.3, 0.6, 0.95], dtype=torch.float64)
    vp = (abar.sqrt(), (1 - abar).sqrt())
    for name, (al, si), b in [
        ("epsilon", vp, -vp[1] / vp[0]), ("v_prediction", vp, -vp[1]), ("velocity", (alpha, sigma), -sigma),
        ("sample", vp, torch.ones(3, dtype=torch.float64)),
    ]:
        xt = noised(x0, noise, al, si)
        o = target(x0, noise, al, si, name) + 0.1 * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        torch.testing.assert_close(predicted_x0(target(x0, noise, al, si, name), xt, al, si, name), x0)
        lhs = adaptive_squared_error(predicted_x0(o, xt, al, si, name), x0, adaptive=False)
        rhs = b**2 * ((o - target(x0, noise, al, si, name)) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=0)


def _grads(policy, loss):
    params = policy.trainable_parameters()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("kind", ["tiny_sd", "tiny_sd3"])
def test_gradient_identities(kind):
    """r = 1 and beta = 1: the gradient is the supervised denoising loss's (scale 1 / beta = 1);
    theta = old and r = 1/2: the gradient vanishes (to rounding, far below its size at r = 1)."""
    policy, _ = _policy(kind)
    batch, x0, steps, alpha, sigma, noise = _inputs(policy)
    x_t = noised(x0, noise, alpha, sigma).float()
    x0, alpha, sigma = x0.float(), alpha.float(), sigma.float()
    cond = batch.conditioning()
    with torch.no_grad():
        out_old = policy._model_output(x_t, steps, cond)
    _perturb(policy._module(), 0.05, seed=3)
    ones = torch.ones(4)
    for adaptive in (True, False):
        out = policy._model_output(x_t, steps, cond)
        terms, _ = nft_loss(out, out_old, x_t, x0, alpha, sigma, ones, 1.0, policy.parametrisation, adaptive)
        g_nft = _grads(policy, terms.mean())
        out = policy._model_output(x_t, steps, cond)
        supervised = adaptive_squared_error(predicted_x0(out, x_t, alpha, sigma, policy.parametrisation), x0, adaptive)
        g_sup = _grads(policy, supervised.mean())
        assert g_sup.abs().max() > 0
        torch.testing.assert_close(g_nft, g_sup, rtol=1e-5, atol=1e-6 * float(g_sup.abs().max()))
    # theta = old: the old outputs come from the same weights
    with torch.no_grad():
        out_same = policy._model_output(x_t, steps, cond)
    for beta in (1.0, 0.1):
        out = policy._model_output(x_t, steps, cond)
        terms, _ = nft_loss(out, out_same, x_t, x0, alpha, sigma, 0.5 * ones, beta, policy.parametrisation)
        g_half = _grads(policy, terms.mean())
        out = policy._model_output(x_t, steps, cond)
        terms, _ = nft_loss(out, out_same, x_t, x0, alpha, sigma, ones, beta, policy.parametrisation)
        g_one = _grads(policy, terms.mean())
        assert g_half.abs().max() < 1e-4 * g_one.abs().max()


def test_batch_std_advantages_and_optimality_probability_by_hand():
    rewards = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    batch_std = math.sqrt(sum((x - 2.0) ** 2 for x in [1, 3, 2, 2]) / 4)  # population std of the batch
    adv = compute_advantages(rewards, "batch_std", std_eps=1e-4)
    expected = torch.tensor([[-1.0, 1.0], [0.0, 0.0]]) / (batch_std + 1e-4)
    torch.testing.assert_close(adv, expected)
    r = optimality_probability(torch.tensor([-7.0, -2.5, 0.0, 1.0, 5.0, 9.0]), 5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.25, 0.5, 0.6, 1.0, 1.0]))


def test_shuffled_control_permutes_r():
    rewards = torch.tensor([[0.1, 0.5, 0.3, 0.9], [0.2, 0.8, 0.4, 0.6], [0.0, 1.0, 0.7, 0.5]])
    adv = compute_advantages(rewards, "batch_std", std_eps=1e-4)
    g = torch.Generator().manual_seed(7)
    shuffled = apply_control(adv, "shuffle", g)
    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(adv.numel(), generator=g)
    r, r_shuffled = optimality_probability(adv, 5.0).flatten(), optimality_probability(shuffled, 5.0).flatten()
    torch.testing.assert_close(r_shuffled, r[perm])
    assert not torch.equal(r_shuffled, r)
    torch.testing.assert_close(r_shuffled.sort().values, r.sort().values)


def test_rwr_weights_and_loss():
    adv = torch.tensor([-1.0, 0.0, 2.0])
    w = rwr_weights(adv, 0.5)
    e = torch.exp(adv.double() / 0.5)
    torch.testing.assert_close(w, (e / e.mean()).float())
    assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-6)
    out, goal = torch.ones(3, 2, 2), torch.zeros(3, 2, 2)
    torch.testing.assert_close(rwr_loss(out, goal, w), w)
    torch.testing.assert_close(rwr_weights(adv[torch.tensor([2, 0, 1])], 0.5), w[torch.tensor([2, 0, 1])])


def test_old_policy_decay_schedule_ema_and_swap():
    assert [old_policy_decay(i, 0.001, 0.5) for i in (0, 1, 200, 500, 900)] == [0.0, 0.001, 0.2, 0.5, 0.5]
    assert old_policy_decay(74, 0.0075, 0.999, 75) == 0.0
    assert math.isclose(old_policy_decay(95, 0.0075, 0.999, 75), 0.15)
    assert old_policy_decay(1000, 0.0075, 0.999, 75) == 0.999
    old, cur = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    ema_update(old, cur, 0.25)
    torch.testing.assert_close(old["w"], torch.tensor([2.5, 5.0]))
    policy, cfg = _policy("tiny_sd")
    cfg = cfg.model_copy(update={"algorithm": cfg.algorithm.model_copy(update={"nft_decay_rate": 0.25})})
    keeper = OldPolicy(policy, cfg)
    start = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
    _perturb(policy._module(), 0.05, seed=3)
    moved = policy.trainable_state_dict()
    with keeper.swapped(policy):
        assert all(torch.equal(v, start[k]) for k, v in policy.trainable_state_dict().items())
    assert all(torch.equal(v, moved[k]) for k, v in policy.trainable_state_dict().items())
    decay = keeper.update(policy, optimizer_steps=2)  # eta = min(0.25 * 2, 0.5)
    assert decay == 0.5
    for k, v in keeper.publishable().items():
        torch.testing.assert_close(v, 0.5 * start[k] + 0.5 * moved[k])
    restored = OldPolicy(policy, cfg)
    restored.load_state_dict(keeper.state_dict())
    assert restored.optimizer_steps == 2
    assert all(torch.equal(v, keeper.publishable()[k]) for k, v in restored.publishable().items())
