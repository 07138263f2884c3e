"""Which steps are stochastic, how a group shares noise, which parameters train, and the null control."""

import math

import numpy as np
import pytest
import torch

from loop_ray.algorithms import apply_control, leave_one_out_advantages, prompt_mean_advantages
from loop_ray.config import ConfigError, config_from_dict
from loop_ray.diffusion.ddim.logprob import ddim_step_with_logprob
from loop_ray.diffusion.ddim.policy import DDIMPolicy
from loop_ray.diffusion.ddim.tiny import tiny_sd_components
from loop_ray.diffusion.gaussian import draw_noise
from loop_ray.diffusion.trainable import select_trainable
from loop_ray.diffusion.windows import stochastic_steps
from loop_ray.training.torch_engine import TorchEngine
from loop_ray.training.update import update_on_shard

torch.set_num_threads(1)

PROMPTS = ["a red circle", "a blue square"]
T, K = 6, 3
SEEDS = [11, 12, 13, 14, 15, 16]


@pytest.fixture(scope="module")
def policy():
    return DDIMPolicy(tiny_sd_components(), num_steps=T, guidance_scale=3.0)


def _reference_sample(policy, prompt_embeds, negative_embeds, seeds):
    """The sampler as it was before step choices existed: one generator per sample drawing x_T and
    then every step's noise, eta = 1 everywhere."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    x = draw_noise((len(seeds), 4, 8, 8), generators, "cpu")
    latents, logps = [x], []
    with torch.no_grad():
        for t in policy.timesteps:
            eps = policy.guided_output(x, t.expand(len(seeds)), prompt_embeds, negative_embeds)
            x, logp = ddim_step_with_logprob(policy.scheduler, eps, t.expand(len(seeds)), x, 1.0, generator=generators)
            latents.append(x)
            logps.append(logp)
    return torch.stack(latents, 1), torch.stack(logps, 1)


def test_all_steps_and_independent_noise_are_the_papers_sampler_bit_for_bit(policy):
    batch = policy.sample(PROMPTS, K, SEEDS)
    explicit = policy.sample(PROMPTS, K, SEEDS, sde_steps=list(range(T)), group_noise="independent", batch_size=4)
    latents, logps = _reference_sample(policy, batch.prompt_embeds, batch.negative_embeds, SEEDS)
    assert torch.equal(batch.latents, latents) and torch.equal(batch.log_probs, logps)
    assert torch.equal(explicit.latents[:4], batch.latents[:4])  # same chunk composition: same kernels
    assert batch.sde_mask.all() and torch.equal(
        policy.trainable_steps_of(batch, 1, 1), policy.trainable_steps(1, 1).expand(len(batch), -1)
    )


def test_a_window_is_the_only_stochastic_and_trainable_part(policy):
    batch = policy.sample(PROMPTS, K, SEEDS, sde_steps=[2, 3, 4])
    assert torch.equal(batch.sde_mask[0], torch.tensor([False, False, True, True, True, False]))
    assert (batch.log_probs[:, [0, 1, 5]] == 0).all() and (batch.log_probs[:, 2:5] != 0).all()
    # skips count inside the window
    assert torch.equal(policy.trainable_steps_of(batch, 1, 0), torch.tensor([[3, 4]] * len(batch)))
    assert torch.equal(policy.trainable_steps_of(batch, 0, 1), torch.tensor([[2, 3]] * len(batch)))
    with pytest.raises(ValueError, match="sde_steps"):
        policy.sample(PROMPTS, 1, SEEDS[:2], sde_steps=[T])


def test_branching_shares_the_prefix_computed_once_per_group_and_parts_at_the_window(policy):
    rows = []
    hook = policy.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        batch = policy.sample(PROMPTS, K, SEEDS, sde_steps=[2, 3], group_noise="branch")
    finally:
        hook.remove()
    # two deterministic prefix steps on one row per group (x2 for CFG), then all 6 rows
    assert rows == [2 * 2] * 2 + [2 * len(SEEDS)] * (T - 2)
    lat = batch.latents
    for g in range(2):
        members = lat[g * K : (g + 1) * K]
        assert all(torch.equal(members[0, : 3], m[: 3]) for m in members)  # identical up to the branch step
        assert all((members[0, 3:] - m[3:]).abs().amax() > 1e-2 for m in members[1:])  # different after
    assert not torch.equal(lat[0, 0], lat[K, 0])  # groups have their own noise
    assert (batch.log_probs[:, [0, 1, 4, 5]] == 0).all()
    # a branched sample is the same however the batch is cut
    again = policy.sample(PROMPTS, K, SEEDS, sde_steps=[2, 3], group_noise="branch", batch_size=2)
    torch.testing.assert_close(again.latents, batch.latents, rtol=0, atol=1e-3)
    # and the stored steps give ratio 1 when recomputed
    logp = policy.log_prob(batch, torch.full((len(batch),), 3))
    assert (torch.exp(logp - batch.log_probs[:, 3]) - 1).abs().max() <= 1e-5


def test_shared_noise_keeps_every_step_stochastic_and_only_the_window_noise_differs(policy):
    batch = policy.sample(PROMPTS, K, SEEDS, sde_steps=[3], group_noise="shared")
    lat, logp = batch.latents, batch.log_probs
    assert (logp != 0).all()  # every step is an eta = 1 step
    assert torch.equal(batch.sde_mask[0], torch.tensor([False, False, False, True, False, False]))
    for g in range(2):
        members = lat[g * K : (g + 1) * K]
        assert all(torch.equal(members[0, :4], m[:4]) for m in members)  # shared noise before the window
        assert all((members[0, 4] - m[4]).abs().amax() > 1e-2 for m in members[1:])  # own noise in it
        # after the window the noise is shared again: the steps' log-probs (a function of the noise) agree
        group_logp = logp[g * K : (g + 1) * K]
        torch.testing.assert_close(group_logp[:, 4:], group_logp[:1, 4:].expand(K, -1), rtol=0, atol=1e-5)
    assert not torch.equal(lat[0, 0], lat[K, 0])
    # each sample is still an exact eta = 1 sample: recomputing any step scores it, not only the window
    steps = torch.tensor([0, 1, 2, 3, 4, 5])
    recomputed = policy.log_prob(batch, steps.expand(len(batch), -1))
    assert (recomputed - logp).abs().max() <= 1e-5


def test_shared_noise_leave_one_out_gradient_is_unbiased_on_a_gaussian_chain():
    """Two-step chain: x1 = x0 + s u (outside the window; u shared by the K samples of a group),
    x2 = x1 + theta + sigma w_i (the window; w_i each sample's own), reward -(x2 - c)^2. The exact
    gradient of E[r] is -2 (theta - c). The estimator mean_i A_i d/dtheta log p(x2_i | x1) with
    leave-one-out A is unbiased under shared noise, because sample i's baseline depends on x1 and the
    other samples' w_j only, which are independent of w_i. The prompt-mean baseline, which contains
    r_i, is biased by the factor (K - 1) / K: the same test with it fails, so this one can fail."""
    gen = torch.Generator().manual_seed(0)
    groups, k, theta, c, s, sigma = 400_000, 4, 0.3, 1.0, 2.0, 0.5
    x0 = torch.randn(groups, 1, generator=gen, dtype=torch.float64)
    u = torch.randn(groups, 1, generator=gen, dtype=torch.float64)  # shared within a group
    w = torch.randn(groups, k, generator=gen, dtype=torch.float64)
    x2 = x0 + s * u + theta + sigma * w
    r = -((x2 - c) ** 2)
    score = w / sigma  # d/dtheta log N(x2; x1 + theta, sigma^2)
    exact = -2 * (theta - c)

    def estimate(advantages):
        g = (advantages * score).mean(1)
        return float(g.mean()), float(g.std() / math.sqrt(groups))

    loo, se = estimate(leave_one_out_advantages(r))
    assert abs(loo - exact) < 4 * se, (loo, exact, se)
    biased, se_b = estimate(prompt_mean_advantages(r))
    assert abs(biased - exact * (k - 1) / k) < 4 * se_b and abs(biased - exact) > 10 * se_b
    # independent outside noise (every sample its own u) is unbiased too, but noisier
    x2_ind = x0 + s * torch.randn(groups, k, generator=gen, dtype=torch.float64) + theta + sigma * w
    ind, se_ind = estimate(leave_one_out_advantages(-((x2_ind - c) ** 2)))
    assert abs(ind - exact) < 4 * se_ind and se_ind > 1.5 * se


def test_antithetic_pairs_mirror_the_window_noise_and_stay_exact_samples(policy):
    seeds = list(range(21, 29))  # 2 prompts x K = 4: two mirrored pairs per group
    batch = policy.sample(PROMPTS, 4, seeds, sde_steps=[3], group_noise="antithetic")
    lat, logp = batch.latents, batch.log_probs
    for g in range(2):
        m = lat[g * 4 : (g + 1) * 4]
        assert all(torch.equal(m[0, :4], r[:4]) for r in m)  # shared noise up to the window
        # x_4 = mu(x_3) + sigma z with x_3 shared: a pair's two samples sit symmetrically about mu
        torch.testing.assert_close(m[0, 4] + m[1, 4], m[2, 4] + m[3, 4], rtol=0, atol=1e-5)
        assert (m[0, 4] - m[2, 4]).abs().amax() > 1e-2  # the two pairs draw their own noise
        # |z| is the same within a pair, so is the window step's log-prob
        torch.testing.assert_close(logp[g * 4, 3], logp[g * 4 + 1, 3], rtol=0, atol=1e-5)
    recomputed = policy.log_prob(batch, torch.arange(T).expand(len(batch), -1))
    assert (recomputed - logp).abs().max() <= 1e-5  # exact eta = 1 samples
    again = policy.sample(PROMPTS, 4, seeds, sde_steps=[3], group_noise="antithetic", batch_size=3)
    # pairs split across chunks: the same samples up to the batch shape's rounding (as for branch)
    torch.testing.assert_close(again.latents, batch.latents, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="must be even"):
        policy.sample(PROMPTS, 3, SEEDS, sde_steps=[3], group_noise="antithetic")


def test_antithetic_leave_one_out_gradient_points_along_the_policy_gradient():
    """The chain of the shared-noise test with the K window noises in mirrored pairs (w, -w):
    x2 = x1 + theta + sigma w, r = -(x2 - c)^2. Sample i's leave-one-out baseline holds its
    partner's reward r(-w_i), and E[r(-w) w] = -E[r(w) w], so the estimator's mean is K/(K-1)
    times the exact gradient -2 (theta - c). Its noise: the reward's part even in w (sigma^2 w^2)
    cancels within a pair, but a group has K/2 independent draws instead of K. Where the even part
    dominates (x1 near c - theta, large sigma) the mirrored estimate is the less noisy per unit of
    gradient; where the linear part does (x1 spread widely) it is the noisier."""
    gen = torch.Generator().manual_seed(1)
    groups, k, theta, c = 400_000, 4, 0.3, 1.0
    factor, exact = k / (k - 1), -2 * (theta - c)

    def noise_and_mean(x1_spread: float, sigma: float, antithetic: bool) -> tuple[float, float]:
        x1 = x1_spread * torch.randn(groups, 1, generator=gen, dtype=torch.float64)
        if antithetic:
            half = torch.randn(groups, k // 2, 1, generator=gen, dtype=torch.float64)
            w = torch.cat([half, -half], dim=2).reshape(groups, k)
        else:
            w = torch.randn(groups, k, generator=gen, dtype=torch.float64)
        r = -((x1 + theta + sigma * w - c) ** 2)
        g = (leave_one_out_advantages(r) * w / sigma).mean(1)
        scale = factor if antithetic else 1.0
        return float(g.mean()) / scale, float(g.std() / math.sqrt(groups)) / scale

    ratios = {}
    for regime, spread, sigma in (("even", 0.1, 2.0), ("linear", 2.0, 0.5)):
        anti, se_anti = noise_and_mean(spread, sigma, antithetic=True)
        own, se_own = noise_and_mean(spread, sigma, antithetic=False)
        assert abs(anti - exact) < 4 * se_anti and abs(own - exact) < 4 * se_own, (regime, anti, own, exact)
        assert abs(anti * factor - exact) > 10 * se_anti * factor  # the factor K/(K-1) is measurable
        ratios[regime] = se_anti / se_own
    assert ratios["even"] < 0.6 and ratios["linear"] > 1.0, ratios


def test_window_placement_fixed_random_sliding():
    def sampling(**kw):
        return config_from_dict({"sampling": {"num_steps": 10, **kw}}).sampling

    assert stochastic_steps(sampling(), 3, 10, 0) is None
    assert stochastic_steps(sampling(sde_steps=[5, 2]), 0, 10, 0) == [2, 5]
    assert stochastic_steps(sampling(sde_window=3, sde_window_start=4), 7, 10, 0) == [4, 5, 6]
    slide = sampling(sde_window=2, sde_window_placement="sliding", sde_window_start=1, sde_window_end=9)
    assert [stochastic_steps(slide, i, 5, 0)[0] for i in range(5)] == [1, 2, 4, 5, 7]
    rand = sampling(sde_window=2, sde_window_placement="random", sde_window_start=2, sde_window_end=8)
    starts = [stochastic_steps(rand, i, 50, 0)[0] for i in range(50)]
    assert set(starts) == {2, 3, 4, 5, 6} and starts == [stochastic_steps(rand, i, 50, 0)[0] for i in range(50)]
    assert starts != [stochastic_steps(rand, i, 50, 1)[0] for i in range(50)]


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"sampling": {"num_steps": 4, "sde_window": 5}}, "sde_window"),
        ({"sampling": {"num_steps": 4, "sde_steps": [1, 4]}}, "sde_steps"),
        ({"sampling": {"num_steps": 4, "sde_steps": [1], "sde_window": 1}}, "sde_steps"),
        ({"sampling": {"num_steps": 8, "sde_window": 2}, "algorithm": {"skip_last_steps": 2}}, "skip_first_steps"),
        ({"sampling": {"group_noise": "forked"}}, "group_noise"),
        ({"sampling": {"group_noise": "antithetic", "k": 3}}, "sampling.k"),
        ({"model": {"lora_rank": 4, "trainable": "cross_attention"}}, "model.trainable"),
        ({"algorithm": {"control": "negate"}}, "algorithm.control"),
    ],
)
def test_bad_step_choices_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(settings)


def test_learner_trains_only_window_steps_and_the_first_ratio_is_one(policy):
    cfg = config_from_dict({
        "model": {"kind": "tiny_sd"},
        "sampling": {"num_steps": T, "k": K, "prompts_per_iteration": 2, "sde_window": 3, "guidance_scale": 3.0},
        "algorithm": {"skip_first_steps": 1, "inner_epochs": 2},
        "learner": {"minibatch_size": 3, "minibatches_per_step": 2, "lr": 1e-4},
    })
    batch = policy.sample(PROMPTS, K, SEEDS, sde_steps=[1, 2, 3], group_noise="branch")
    seen = []
    original = policy.log_prob

    def recording(b, idx):
        seen.extend(torch.as_tensor(idx).flatten().tolist())
        return original(b, idx)

    policy.log_prob = recording
    try:
        state = {k: v.clone() for k, v in policy.unet.state_dict().items()}
        engine = TorchEngine(cfg, policy.trainable_parameters(), grad_accum_steps=2 * 2)
        metrics = update_on_shard(engine, policy, batch, torch.randn(len(batch)), cfg, torch.Generator().manual_seed(0))
    finally:
        policy.log_prob = original
        policy.unet.load_state_dict(state)
    assert set(seen) == {2, 3}  # the window [1, 2, 3] less its first step; deterministic steps never
    assert metrics["first_ratio_max_abs_dev"] <= 1e-5 and metrics["optimizer_steps"] == 2


def test_cross_attention_only_and_frozen_prefixes_choose_the_trained_parameters():
    unet = tiny_sd_components().unet
    n = select_trainable(unet, "cross_attention")
    trained = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert trained and all(".attn2." in name for name in trained) and n == sum(
        p.numel() for p in unet.parameters() if p.requires_grad
    )
    select_trainable(unet, "all", ["conv_out", "conv_norm_out"])
    frozen = {name for name, p in unet.named_parameters() if not p.requires_grad}
    assert frozen == {"conv_out.weight", "conv_out.bias", "conv_norm_out.weight", "conv_norm_out.bias"}
    with pytest.raises(ValueError, match="conv_outt"):
        select_trainable(unet, "all", ["conv_outt"])
    # a policy with frozen parts syncs only what trains
    cfg = config_from_dict({"model": {"kind": "tiny_sd", "freeze": ["conv_out"]}})
    from loop_ray.diffusion.factory import build_policy

    keys = build_policy(cfg).trainable_state_dict().keys()
    assert "conv_in.weight" in keys and "conv_out.weight" not in keys


def test_shuffle_control_permutes_advantages_across_groups():
    adv = torch.arange(12.0).view(3, 4)
    same = apply_control(adv, "none", torch.Generator().manual_seed(0))
    shuffled = apply_control(adv, "shuffle", torch.Generator().manual_seed(0))
    assert torch.equal(same, adv) and shuffled.shape == adv.shape
    assert sorted(shuffled.flatten().tolist()) == list(range(12)) and not torch.equal(shuffled, adv)
    assert not all(set(row.tolist()) == set(orig.tolist()) for row, orig in zip(shuffled, adv))
    assert np.array_equal(shuffled, apply_control(adv, "shuffle", torch.Generator().manual_seed(0)))
