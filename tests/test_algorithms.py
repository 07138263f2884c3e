"""Advantage estimators and the policy loss against hand-computed cases and a Gaussian bandit."""

import math

import pytest
import torch

from loop_ray.algorithms import (
    PRESETS,
    StatTracker,
    compute_advantages,
    group_std_advantages,
    leave_one_out_advantages,
    policy_loss,
    prompt_mean_advantages,
)

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "rewards, expected",
    [
        ([[1.0, 3.0]], [[-2.0, 2.0]]),  # K=2: each sample against the other
        ([[1.0, 2.0, 6.0]], [[1 - 4.0, 2 - 3.5, 6 - 1.5]]),  # K=3: baselines (2+6)/2, (1+6)/2, (1+2)/2
        ([[0.0, 1.0, 2.0, 5.0]], [[-8 / 3, 1 - 7 / 3, 0.0, 4.0]]),  # K=4
    ],
)
def test_leave_one_out_hand_computed(rewards, expected):
    A = leave_one_out_advantages(torch.tensor(rewards))
    torch.testing.assert_close(A, torch.tensor(expected), rtol=0, atol=1e-6)


def test_leave_one_out_baseline_does_not_depend_on_own_reward():
    r = torch.tensor([[0.3, -1.2, 2.5, 0.7]], requires_grad=True)
    A = leave_one_out_advantages(r)
    for i in range(4):
        baseline_i = r[0, i] - A[0, i]
        (grad,) = torch.autograd.grad(baseline_i, r, retain_graph=True)
        assert grad[0, i].item() == 0.0  # the baseline of i ignores r_i
        assert torch.all(grad[0, torch.arange(4) != i] != 0)  # and uses every other reward


def test_group_estimators_need_k_two():
    for fn in (leave_one_out_advantages, prompt_mean_advantages, group_std_advantages):
        with pytest.raises(ValueError, match="K >= 2"):
            fn(torch.ones(3, 1))
    with pytest.raises(ValueError, match="groups, K"):
        leave_one_out_advantages(torch.ones(4))


def test_prompt_mean_and_group_std_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    torch.testing.assert_close(prompt_mean_advantages(r), torch.tensor([[-2.0, -1.0, 0.0, 3.0]]))
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # Bessel-corrected
    torch.testing.assert_close(group_std_advantages(r, std_eps=0.0), torch.tensor([[-2.0, -1.0, 0.0, 3.0]]) / std)
    # LOO is prompt_mean scaled by K/(K-1)
    torch.testing.assert_close(leave_one_out_advantages(r), prompt_mean_advantages(r) * 4 / 3)


def test_stat_tracker_falls_back_to_batch_then_tracks_each_prompt():
    tracker = StatTracker(buffer_size=4, min_count=2, std_eps=0.0)
    A = tracker.update(["a", "b"], torch.tensor([1.0, 3.0]))  # one reward each: batch mean 2, std 1
    torch.testing.assert_close(A, torch.tensor([-1.0, 1.0]))
    A = tracker.update(["a", "b"], torch.tensor([3.0, 7.0]))  # now per prompt: a: {1,3}, b: {3,7}
    torch.testing.assert_close(A, torch.tensor([1.0, 1.0]))
    state = tracker.state_dict()
    other = StatTracker()
    other.load_state_dict(state)
    torch.testing.assert_close(other.update(["a"], torch.tensor([2.0])), tracker.update(["a"], torch.tensor([2.0])))


def test_compute_advantages_dispatch_and_errors():
    r = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    torch.testing.assert_close(compute_advantages(r, "none"), r)
    torch.testing.assert_close(compute_advantages(r, "leave_one_out"), leave_one_out_advantages(r))
    tracker = StatTracker(min_count=1)
    out = compute_advantages(r, "stat_tracker", stat_tracker=tracker, prompts=["p", "q"])
    assert out.shape == (2, 2)
    with pytest.raises(ValueError, match="stat_tracker"):
        compute_advantages(r, "stat_tracker")
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages(r, "median")


def test_gradient_at_ratio_one_equals_reinforce():
    theta = torch.randn(6, requires_grad=True)
    features = torch.randn(6, 6)
    A = torch.randn(6)
    logp = torch.log_softmax(features @ theta, 0)
    loss_is, metrics = policy_loss(logp, logp.detach(), A, clip_eps=1e-4)
    (g_is,) = torch.autograd.grad(loss_is, theta)
    logp = torch.log_softmax(features @ theta, 0)
    loss_pg, _ = policy_loss(logp, logp.detach(), A, clip_eps=1e-4, importance_sampling=False)
    (g_pg,) = torch.autograd.grad(loss_pg, theta)
    torch.testing.assert_close(g_is, g_pg)
    assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0 and metrics["clip_fraction"] == 0.0


@pytest.mark.parametrize(
    "advantage, log_ratio, grad_zero",
    [
        (+1.0, +0.1, True),  # A > 0 and rho > 1 + eps: clipped, no further push up
        (+1.0, -0.1, False),  # A > 0 and rho < 1 - eps: the unclipped term is the min, gradient flows
        (-1.0, -0.1, True),  # A < 0 and rho < 1 - eps: clipped
        (-1.0, +0.1, False),  # A < 0 and rho > 1 + eps: gradient flows (pulls rho back)
        (+1.0, +1e-6, False),  # inside the clip range
    ],
)
def test_clip_stops_gradient_on_the_correct_side(advantage, log_ratio, grad_zero):
    logp_old = torch.tensor([-1.0])
    logp_new = (logp_old + log_ratio).clone().requires_grad_(True)
    loss, metrics = policy_loss(logp_new, logp_old, torch.tensor([advantage]), clip_eps=1e-2)
    (grad,) = torch.autograd.grad(loss, logp_new)
    assert (grad.abs().item() == 0.0) == grad_zero
    if not grad_zero:  # the gradient of -A*rho w.r.t. logp is -A*rho
        assert grad.item() == pytest.approx(-advantage * math.exp(log_ratio), rel=1e-5)
    assert metrics["clip_fraction"] == (1.0 if abs(log_ratio) > 1e-2 else 0.0)


def test_approx_kl_metric():
    logp_old = torch.zeros(4)
    logp_new = torch.tensor([0.1, -0.1, 0.2, 0.0])
    _, m = policy_loss(logp_new, logp_old, torch.ones(4), clip_eps=0.5)
    assert m["approx_kl"] == pytest.approx(0.5 * (0.01 + 0.01 + 0.04) / 4)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2), 0.1)


# -- a Gaussian bandit with a known optimum ------------------------------------------------------
# Policy a ~ N(mu, 1); reward r(a) = 50 - (a - 3)^2, maximal at mu = 3. The large constant offset
# is what a baseline removes.


def _bandit_logp(mu: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return -0.5 * (a - mu) ** 2 - 0.5 * math.log(2 * math.pi)


def _bandit_reward(a: torch.Tensor) -> torch.Tensor:
    return 50.0 - (a - 3.0) ** 2


def test_loop_converges_on_gaussian_bandit():
    gen = torch.Generator().manual_seed(0)
    mu = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([mu], lr=0.05)
    G, K, epochs = 8, 4, 2
    for _ in range(300):
        with torch.no_grad():
            a = mu + torch.randn(G, K, generator=gen)
            logp_old = _bandit_logp(mu, a)
            A = compute_advantages(_bandit_reward(a), "leave_one_out")
        for _ in range(epochs):  # several epochs over the sampled buffer, as LOOP does
            loss, _ = policy_loss(_bandit_logp(mu, a), logp_old, A, clip_eps=0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert abs(mu.item() - 3.0) < 0.15


def _gradient_draws(estimator: str, n: int, K: int = 4) -> torch.Tensor:
    """n independent single-group estimates of d/dmu of E[r] at mu = 0 (true value 6)."""
    gen = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(n):
        mu = torch.zeros((), requires_grad=True)
        a = torch.randn(1, K, generator=gen)
        A = compute_advantages(_bandit_reward(a), estimator)
        loss, _ = policy_loss(_bandit_logp(mu, a), _bandit_logp(mu, a).detach(), A, 0.2, importance_sampling=False)
        (g,) = torch.autograd.grad(-loss, mu)
        grads.append(g)
    return torch.stack(grads)


def test_leave_one_out_lowers_gradient_variance_and_stays_unbiased():
    plain = _gradient_draws("none", 4000)
    loo = _gradient_draws("leave_one_out", 4000)
    true_grad = 6.0  # d/dmu E[50 - (a-3)^2] = -2(mu - 3) at mu = 0
    for g in (plain, loo):
        stderr = g.std().item() / math.sqrt(len(g))
        assert abs(g.mean().item() - true_grad) < 4 * stderr
    assert loo.var().item() < 0.25 * plain.var().item()


def test_presets_are_consistent_configs():
    from loop_ray.config import config_from_dict

    for name in PRESETS:
        cfg = config_from_dict({"algorithm": {"preset": name}, "sampling": {"prompts_per_iteration": 8}})
        for dotted, value in PRESETS[name].items():
            section, key = dotted.split(".")
            assert getattr(getattr(cfg, section), key) == value
