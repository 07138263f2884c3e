"""The alignment diagnostic and the levers it measures: per-step loss weights against hand
computations and diffusers' own DDIM step, guidance distillation against its fixed points, the
alignment curve against a direction known in advance, and SGD as the learner's optimizer."""

import itertools
import json

import pytest
import torch
from diffusers import DDIMScheduler

from loop_ray.algorithms import step_loss_weights
from loop_ray.alignment import (
    align,
    cosine,
    distill_guidance,
    distillation_loss,
    parameter_blocks,
    teacher_of,
)
from loop_ray.cli.main import main as cli_main
from loop_ray.config import config_from_dict
from loop_ray.diagnose import per_prompt_gradients
from loop_ray.diffusion.ddim.policy import DDIMPolicy
from loop_ray.diffusion.ddim.tiny import tiny_sd_components
from loop_ray.training.torch_engine import TorchEngine
from loop_ray.training.update import policy_step_weights

torch.set_num_threads(1)


def test_step_loss_weights_by_hand():
    sigmas = torch.tensor([0.8, 0.4, 0.0, 0.1], dtype=torch.float64)
    gains = torch.tensor([0.2, -0.4, 0.3, -0.05], dtype=torch.float64)
    trained = torch.tensor([0, 1, 3])
    assert step_loss_weights(sigmas, gains, trained, "none").tolist() == [1.0, 1.0, 1.0, 1.0]
    # sigma: [0.8, 0.4, 0, 0.1] / 0.8
    assert step_loss_weights(sigmas, gains, trained, "sigma").tolist() == pytest.approx([1.0, 0.5, 0.0, 0.125])
    # output: sigma / |g| = [4, 1, 0, 2] / 4
    assert step_loss_weights(sigmas, gains, trained, "output").tolist() == pytest.approx([1.0, 0.25, 0.0, 0.5])
    assert step_loss_weights(sigmas, gains, trained, "output").dtype == torch.float32
    with pytest.raises(ValueError, match="every trained step has weight 0"):
        step_loss_weights(sigmas, gains, torch.tensor([2]), "sigma")
    with pytest.raises(ValueError, match="step weight 'cube'"):
        step_loss_weights(sigmas, gains, trained, "cube")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_mean_gain_matches_diffusers_ddim_step(prediction_type):
    """g_j = d mu_j / d output: diffusers' DDIMScheduler.step at sample 0, output 1 and zero noise
    gives mu_j(0, 1) = g_j. The scheduler's abar are cast to float64 so that diffusers computes the
    step in float64 as the policy does (from the same abar values): the coefficients cancel to
    ~1e-2 from terms of order 1, so float32 arithmetic alone would differ by ~1e-5 relative."""
    components = tiny_sd_components(prediction_type=prediction_type)
    policy = DDIMPolicy(components, num_steps=5, guidance_scale=1.0, eta=1.0)
    gains = policy.mean_gain(torch.arange(5))
    scheduler = DDIMScheduler.from_config(components.scheduler.config)
    scheduler.set_timesteps(5)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).double()
    for j, t in enumerate(scheduler.timesteps):
        ones, zeros = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
        ref = scheduler.step(ones, t, zeros, eta=1.0, variance_noise=zeros).prev_sample
        assert float(gains[j]) == pytest.approx(float(ref), rel=1e-12, abs=1e-14)


def test_policy_step_weights_follow_the_config():
    policy = DDIMPolicy(tiny_sd_components(), num_steps=4, guidance_scale=1.0)
    steps = torch.tensor([[0, 1], [0, 1]])
    assert policy_step_weights(policy, steps, "none") is None
    w = policy_step_weights(policy, steps, "sigma")
    torch.testing.assert_close(w, (policy.sigmas / policy.sigmas[:2].max()).float())


def _batch(policy, k=2):
    return policy.sample(["a red circle", "a blue square"], k, [1, 2, 3, 4])


def test_distillation_toward_itself_moves_nothing_and_restores_the_weights():
    """A teacher with guidance 1 is the student itself: the regression's loss and gradient are 0,
    so d = 0; with guidance 3 the loss is positive, d is not 0, and the policy's weights come back."""
    policy = DDIMPolicy(tiny_sd_components(), num_steps=3, guidance_scale=1.0)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    batch = _batch(policy)
    gen = torch.Generator().manual_seed(0)
    d, g = distill_guidance(policy, 1.0, lambda r: batch, rounds=2, lr=1e-3, minibatch=4, generator=gen)
    assert d.numel() == sum(p.numel() for p in before) == g.numel()
    assert float(d.abs().max()) == 0.0 and float(g.abs().max()) == 0.0
    d, g = distill_guidance(policy, 3.0, lambda r: batch, rounds=2, lr=1e-3, minibatch=4, generator=gen)
    assert float(d.norm()) > 0 and float(g.norm()) > 0
    # g is -grad of the mean squared error over every (sample, step) state of the first round
    teacher = teacher_of(policy, 3.0)
    rows, at = torch.arange(4).repeat_interleave(3), torch.arange(3).repeat(4)
    grads = torch.autograd.grad(distillation_loss(policy, teacher, batch, rows, at), policy.trainable_parameters())
    direct = -torch.cat([x.flatten() for x in grads])
    assert float((g - direct).norm() / direct.norm()) < 1e-5
    for p, b in zip(policy.trainable_parameters(), before):
        assert torch.equal(p.detach(), b)
    teacher = teacher_of(policy, 3.0)
    assert teacher.guidance_scale == 3.0 and not any(p.requires_grad for p in teacher.unet.parameters())
    # the teacher keeps its own network: moving the student leaves the teacher's prediction as it was
    x, at, cond = batch.latents[:, 1], torch.ones(4, dtype=torch.long), batch.conditioning()
    fixed = teacher.model_output(x, at, cond)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1)
    assert policy.guidance_scale == 1.0
    torch.testing.assert_close(teacher.model_output(x, at, cond), fixed, rtol=0, atol=0)
    assert not torch.allclose(policy.model_output(x, at, cond), fixed)


def test_parameter_blocks_cover_the_vector_and_find_cross_attention():
    policy = DDIMPolicy(tiny_sd_components(), num_steps=3, guidance_scale=1.0)
    named = list(policy.unet.named_parameters())
    blocks = parameter_blocks(named)
    dim = sum(p.numel() for _, p in named)
    covered = sorted((s.start, s.stop) for name, spans in blocks.items() if name != "cross_attention" for s in spans)
    assert covered[0][0] == 0 and covered[-1][1] == dim
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))  # contiguous, no overlap
    attn2 = sum(p.numel() for n, p in named if ".attn2." in n)
    assert attn2 > 0 and sum(s.stop - s.start for s in blocks["cross_attention"]) == attn2


def test_cosine_by_hand():
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(2**-0.5)
    assert cosine(torch.tensor([1.0, 2.0]), torch.tensor([-2.0, -4.0])) == pytest.approx(-1.0)
    assert cosine(torch.zeros(2), torch.ones(2)) != cosine(torch.zeros(2), torch.ones(2))  # NaN


# the tiny random SD stack (its output depends on the prompt, so guidance moves it) on the toy prompts
MODEL = "model:\n  kind: tiny_sd\nprompts:\n  train: toy:train\n  val: toy:val\n"
REWARD = "reward:\n  terms:\n    - name: jpeg_compressibility\n"


@pytest.fixture(scope="module")
def toy_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    return config_from_dict({
        "name": "align", "seed": 0, "model": {"kind": "tiny_sd"},
        "prompts": {"train": "toy:train", "val": "toy:val"},
        "sampling": {"num_steps": 3, "k": 2, "prompts_per_iteration": 4, "batch_size": 8, "guidance_scale": 1.0},
        "reward": {"terms": [{"name": "jpeg_compressibility"}]}, "algorithm": {"preset": "loop", "skip_last_steps": 1},
        "learner": {"num_workers": 1, "minibatch_size": 2},
    }), root


def test_align_against_the_estimate_itself(toy_cfg):
    """With the direction set to the design's own summed policy gradient over the same images, the
    true estimate's cosine is 1 (up to float32 summation order), and the shuffled nulls' are not."""
    cfg, _ = toy_cfg
    from loop_ray.algorithms import StatTracker
    from loop_ray.diagnose import sample_scored
    from loop_ray.diffusion.factory import build_policy
    from loop_ray.prompts import load_prompts
    from loop_ray.rewards.composite import CompositeReward

    policy = build_policy(cfg)
    batch, _, adv = sample_scored(cfg, policy, CompositeReward.from_config(cfg.reward),
                                  load_prompts(cfg.prompts.train), 0, StatTracker.for_algorithm(cfg.algorithm))
    steps = policy.trainable_steps_of(batch, 0, 1)
    g = per_prompt_gradients(policy, batch, 2, steps, {"true": adv.flatten()})["true"].sum(0)
    result = align(cfg, {"own": g, "minus": -g}, images=8, every=4, nulls=2, log=lambda _m: None)
    assert [p["images"] for p in result["curve"]] == [4, 8]
    last = result["curve"][-1]
    assert last["own"]["true"] == pytest.approx(1.0, abs=1e-5) and last["minus"]["true"] == pytest.approx(-1.0, abs=1e-5)
    assert all(abs(last["own"][n]) < 0.99 for n in ("null0", "null1"))
    assert [r["step"] for r in result["per_step"]] == [0, 1]
    assert sum(r["share"] for r in result["per_step"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="the config trains"):
        align(cfg, {"short": g[:-1]}, images=8, every=4, log=lambda _m: None)


def test_cli_align_writes_and_reuses_a_direction(toy_cfg, capsys):
    _, root = toy_cfg
    path = root / "align.yaml"
    path.write_text(
        f"name: align\nseed: 0\n{MODEL}{REWARD}"
        "sampling:\n  num_steps: 3\n  k: 2\n  prompts_per_iteration: 4\n  batch_size: 8\n  guidance_scale: 1.0\n"
        "algorithm:\n  preset: loop\n  step_weight: sigma\nlearner:\n  num_workers: 1\n  minibatch_size: 2\n"
    )
    d, out = root / "dir" / "d.pt", root / "align.json"
    args = ["diagnose", "--config", str(path), "--align", "--images", "8", "--every", "4", "--nulls", "1",
            "--distill-rounds", "1", "--distill-images", "4"]
    assert cli_main([*args, "--save-direction", str(d), "--out", str(out)]) == 0
    first = json.loads(out.read_text())
    assert d.is_file() and first["direction"]["rounds"] == 1 and first["direction"]["parameters"] == first["parameters"]
    assert "alignment with guidance distillation" in capsys.readouterr().out
    assert cli_main([*args, "--direction", str(d), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["curve"] == first["curve"]  # same direction, same plan, same seeds
    assert set(first["curve"][-1]) == {"images", "distilled", "distill_grad"}
    assert cli_main([*args, "--direction", str(root / "missing.pt")]) == 2
    with pytest.raises(ValueError, match="moved no weight"):  # the student already samples with w = 2
        cli_main([*args, "--set", "sampling.guidance_scale=2.0"])


def test_sgd_engine_step_is_lr_times_the_clipped_gradient():
    cfg = config_from_dict({"learner": {"optimizer": "sgd", "lr": 0.5, "weight_decay": 0.0, "max_grad_norm": 1.0}})
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    engine = TorchEngine(cfg, [w], grad_accum_steps=1)
    assert isinstance(engine.optimizer, torch.optim.SGD)
    engine.backward((torch.tensor([3.0, 4.0]) * w).sum())  # gradient (3, 4), norm 5 -> clipped to (0.6, 0.8)
    engine.step()
    torch.testing.assert_close(w.detach(), torch.tensor([1.0 - 0.3, 2.0 - 0.4]))
