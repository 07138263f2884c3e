"""`loop-ray diagnose`: the statistics against hand-computed cases and brute force, the gradients
against one backward pass, and the command end to end (figures present, a planted signal found)."""

import json
import math

import pytest
import torch

from loop_ray.cli.main import main as cli_main
from loop_ray.diagnose import (
    all_pairs_ratio,
    gram,
    jackknife_pair_ratio,
    pair_ratio,
    participation_ratio,
    per_prompt_gradients,
    split_half_cosines,
    within_group_std,
)
from loop_ray.diffusion.ddim.policy import DDIMPolicy
from loop_ray.diffusion.ddim.tiny import tiny_sd_components
from loop_ray.toy.model import TINY_SPEC, build_toy_components, save_toy_model

torch.set_num_threads(1)


def _brute_ratio(vectors: torch.Tensor) -> float:
    """mean_{p != q} g_p . g_q / mean_p |g_p|^2 by an explicit double loop."""
    v = vectors.to(torch.float64)
    n = len(v)
    cross = [float(v[p] @ v[q]) for p in range(n) for q in range(n) if p != q]
    return (sum(cross) / len(cross)) / (sum(float(v[p] @ v[p]) for p in range(n)) / n)


def test_pair_ratio_by_hand():
    # pairs: e1.e2 = 0, e1.(1,1) = 1, e2.(1,1) = 1 -> mean 2/3; mean |g|^2 = 4/3 -> 1/2
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert all_pairs_ratio(v) == pytest.approx(0.5)
    assert pair_ratio(8.0, 4.0, 3) == pytest.approx(0.5)  # |S|^2 = |(2, 2)|^2 = 8, Q = 4
    assert all_pairs_ratio(torch.ones(5, 7)) == pytest.approx(1.0)  # one direction
    assert all_pairs_ratio(torch.eye(4)) == pytest.approx(0.0)  # orthogonal
    assert all_pairs_ratio(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])) == pytest.approx(-1.0)
    assert math.isnan(pair_ratio(0.0, 0.0, 3)) and math.isnan(pair_ratio(1.0, 1.0, 1))


def test_pair_ratio_and_gram_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    for n, d in [(3, 5), (7, 40), (12, 300)]:
        v = torch.randn(n, d, generator=gen) + 0.3 * torch.randn(d, generator=gen)  # a shared part
        torch.testing.assert_close(gram(v, chunk=7), v.double() @ v.double().T)
        assert all_pairs_ratio(v) == pytest.approx(_brute_ratio(v), rel=1e-10)
        s = v.double().sum(0)
        q = float((v.double() ** 2).sum())
        assert pair_ratio(float(s @ s), q, n) == pytest.approx(_brute_ratio(v), rel=1e-10)


def test_jackknife_matches_explicit_leave_one_out():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(9, 30, generator=gen) + torch.randn(30, generator=gen)
    jack = jackknife_pair_ratio(v)
    loo = [_brute_ratio(torch.cat([v[:p], v[p + 1 :]])) for p in range(len(v))]
    assert jack["leave_one_out"] == pytest.approx(loo, rel=1e-9)
    mean = sum(loo) / len(loo)
    se = math.sqrt((len(v) - 1) / len(v) * sum((x - mean) ** 2 for x in loo))
    assert jack["se"] == pytest.approx(se, rel=1e-9)
    assert jack["rho"] == pytest.approx(_brute_ratio(v), rel=1e-10)
    assert jack["z"] == pytest.approx(jack["rho"] / se, rel=1e-9)
    assert jack["z"] > 3  # a shared direction of this size is found
    with pytest.raises(ValueError, match="3 prompts"):
        jackknife_pair_ratio(v[:2])


def test_split_half_cosines_match_explicit_halves():
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(7, 20, generator=gen).double()
    got = split_half_cosines(v, 25, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    for r in range(25):
        perm = torch.randperm(7, generator=replay)
        a, b = v[perm[:3]].sum(0), v[perm[3:]].sum(0)
        assert float(got[r]) == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-10)
    two = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # whatever the halving: cos 45 degrees
    assert split_half_cosines(two, 4, gen).tolist() == pytest.approx([math.sqrt(0.5)] * 4)
    assert split_half_cosines(torch.ones(6, 3), 3, gen).tolist() == pytest.approx([1.0] * 3)


def test_participation_ratio_and_within_group_std_by_hand():
    assert participation_ratio(torch.ones(10)) == pytest.approx(10.0)
    assert participation_ratio(torch.tensor([0.0, -3.0, 0.0])) == pytest.approx(1.0)
    assert participation_ratio(torch.tensor([1.0, 2.0])) == pytest.approx(25.0 / 17.0)
    assert math.isnan(participation_ratio(torch.zeros(3)))
    rewards = torch.tensor([[0.0, 2.0], [1.0, 1.0], [0.0, 4.0]])  # stds sqrt(2), 0, sqrt(8)
    assert within_group_std(rewards) == pytest.approx((math.sqrt(2) + math.sqrt(8)) / 3)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b|: float32 sums taken in another order differ by rounding, not more."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_per_prompt_gradients_sum_to_one_backward_pass():
    """Sum over prompts and steps of the step-major per-prompt gradients = the gradient of
    sum_i w_i sum_j log p(step j of i) in one backward pass, for each weighting."""
    policy = DDIMPolicy(tiny_sd_components(), num_steps=3, guidance_scale=2.0)
    k = 2
    batch = policy.sample(["a red circle", "a blue square"], k, [1, 2, 3, 4])
    steps = policy.trainable_steps_of(batch, 0, 1)  # [B, 2]
    weights = {"a": torch.tensor([0.5, -0.5, 1.0, -2.0]), "b": torch.tensor([1.0, 0.0, -1.0, 3.0])}
    seen = []
    totals = per_prompt_gradients(policy, batch, k, steps, weights, lambda c, cur: seen.append((c, cur["a"].clone())))
    params = policy.trainable_parameters()
    dim = sum(p.numel() for p in params)
    assert [c for c, _ in seen] == [0, 1] and totals["a"].shape == (2, dim)
    torch.testing.assert_close(seen[0][1] + seen[1][1], totals["a"])
    for name, w in weights.items():
        logp = policy.log_prob(batch, steps)  # [B, 2]
        grads = torch.autograd.grad((w[:, None] * logp).sum(), params, allow_unused=True)
        direct = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
        assert _rel_err(totals[name].sum(0), direct) < 1e-5
        rows = slice(0, k)  # prompt 0 alone
        grads0 = torch.autograd.grad((w[rows, None] * policy.log_prob(batch.select(torch.arange(k)), steps[rows])).sum(),
                                     params, allow_unused=True)
        direct0 = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads0, params)])
        assert _rel_err(totals[name][0], direct0) < 1e-5


# ------------------------------------------------------------------------------- end to end

# everything but the UNet's output convolution is frozen: the channel-mean reward's true gradient
# then has a direction shared by every prompt (the output bias of that channel), which a few
# hundred samples find; with the full network the same signal needs many more prompts
FREEZE = ["conv_in", "time_embedding", "down_blocks", "up_blocks", "mid_block", "conv_norm_out"]


def _config(root, reward: str, prompts: int, k: int, sampling: str = "") -> str:
    path = root / f"{reward.split(':')[-1]}_{prompts}_{k}.yaml"
    path.write_text(
        f"name: diag\nseed: 0\nmodel:\n  kind: toy\n  path: {root / 'model'}\n  freeze: {FREEZE}\n"
        f"sampling:\n  num_steps: 3\n  k: {k}\n  prompts_per_iteration: {prompts}\n  batch_size: 64\n{sampling}"
        f"reward:\n  terms:\n    - name: {reward}\nalgorithm:\n  preset: loop\n"
        f"learner:\n  num_workers: 1\n  minibatch_size: {k}\n"
    )
    return str(path)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnose")
    save_toy_model(build_toy_components(TINY_SPEC, seed=0), root / "model")
    return root


def _run(argv, capsys) -> str:
    assert cli_main(["diagnose", *argv]) == 0
    return capsys.readouterr().out


def _finite_numbers(x):
    if isinstance(x, dict):
        return all(_finite_numbers(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite_numbers(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return x is not None


def test_cli_writes_every_figure(tiny_root, capsys):
    out = tiny_root / "smoke.json"
    cfg = _config(tiny_root, "toy_binding", 16, 2)
    text = _run(["--config", cfg, "--prompts", "4", "--splits", "5", "--out", str(out),
                 "--set", "model.freeze=[]", "--set", "algorithm.skip_last_steps=1"], capsys)
    data = json.loads(out.read_text())
    assert set(data["total"]) == {"true", "shuffled"}
    for side in data["total"].values():
        assert set(side) == {"split_half_cosine_mean", "split_half_cosine_std", "rho", "rho_se", "z",
                             "mean_sq_norm", "participation_ratio"}
    assert [row["step"] for row in data["per_step"]] == [0, 1] == data["settings"]["trained_steps"]
    for row in data["per_step"]:
        for side in ("true", "shuffled"):
            assert set(row[side]) >= {"rho", "z", "share"}
    assert set(data["reward"]) == {"mean", "within_group_std"}
    assert data["settings"]["prompts"] == 4 and data["settings"]["k"] == 2  # --prompts overrides the config
    assert data["settings"]["trainable_parameters"] == sum(
        p.numel() for p in build_toy_components(TINY_SPEC).unet.parameters()
    )
    assert _finite_numbers(data)
    assert "split-half cosine" in text and "jackknife z" in text and "rho null" in text
    with pytest.raises(SystemExit, match="prompts"):
        cli_main(["diagnose", "--config", cfg, "--prompts", "2"])
    assert cli_main(["diagnose", "--config", cfg, "--set", "sampling.nope=1"]) == 2
    assert "loop-ray diagnose: " in capsys.readouterr().err


@pytest.mark.slow
def test_a_planted_signal_is_found_and_pure_noise_is_not(tiny_root, capsys):
    """One stochastic step (t=667, sigma 0.48) with the rest of the chain's noise shared by the group:
    the reward (the mean red of the image) is then a smooth function of that step's noise, so the
    true gradient has one direction; a reward of independent noise has none."""
    sampling = "  sde_steps: [0]\n  group_noise: shared\n"
    figures = {}
    for reward in ("signal_rewards:ChannelMean", "signal_rewards:IndependentNoise"):
        out = tiny_root / f"{reward.split(':')[1]}.json"
        _run(["--config", _config(tiny_root, reward, 40, 8, sampling), "--splits", "50", "--out", str(out)], capsys)
        data = json.loads(out.read_text())
        assert data["settings"]["trainable_parameters"] == 3 * 8 * 9 + 3 and _finite_numbers(data)
        figures[reward.split(":")[1]] = data["total"]
    signal, null = figures["ChannelMean"]["true"], figures["ChannelMean"]["shuffled"]
    assert signal["z"] > 3 and signal["rho"] > null["rho"] + 0.05
    assert signal["split_half_cosine_mean"] > 0.5 and null["split_half_cosine_mean"] < 0.2
    noise = figures["IndependentNoise"]["true"]
    assert abs(noise["rho"]) < 0.05 and abs(noise["split_half_cosine_mean"]) < 0.3 and abs(noise["z"]) < 3

