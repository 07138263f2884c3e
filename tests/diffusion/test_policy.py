"""DDIMPolicy on the tiny SD stack: shapes, seeds, guidance, deterministic steps, gradients, weights (what
every policy kind shares: tests/diffusion/test_policy_contract.py)."""

import sys
import types

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from numerics import directional_derivative, logprob_atol, network_rel_error, sampler_atol

from loop_ray.config import ExperimentConfig
from loop_ray.diffusion.ddim.policy import DDIMPolicy
from loop_ray.diffusion.ddim.tiny import tiny_sd_components
from loop_ray.diffusion.factory import build_policy

torch.set_num_threads(1)

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle"]
T = 4


def make_policy(guidance_scale=3.0, eta=1.0, num_steps=T, **component_kwargs):
    return DDIMPolicy(
        tiny_sd_components(**component_kwargs), num_steps=num_steps, guidance_scale=guidance_scale, eta=eta
    )


@pytest.fixture(scope="module")
def policy():
    return make_policy()


@pytest.fixture(scope="module")
def batch(policy):
    return policy.sample(PROMPTS, k=2, seeds=[10, 11, 12, 13, 14, 15], version=7)


def test_sample_record_shapes_dtypes_and_groups(policy, batch):
    B = len(PROMPTS) * 2
    assert batch.prompts == [p for p in PROMPTS for _ in range(2)]
    assert batch.latents.shape == (B, T + 1, 4, 8, 8) and batch.latents.dtype == torch.float32
    assert torch.equal(batch.timesteps, torch.tensor([[751, 501, 251, 1]] * B))
    assert batch.log_probs.shape == (B, T) and batch.log_probs.dtype == torch.float32
    assert torch.isfinite(batch.log_probs).all()
    assert batch.images.shape == (B, 16, 16, 3) and batch.images.dtype == torch.uint8
    assert batch.prompt_embeds.shape == batch.negative_embeds.shape == (B, 32, 32)
    assert torch.equal(batch.group_ids, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(batch.prompt_ids, batch.group_ids)
    assert torch.equal(batch.seeds, torch.arange(10, 16)) and batch.version == 7
    assert torch.equal(batch.negative_embeds[0], policy.encode_prompts([""])[0])
    assert torch.equal(batch.prompt_embeds[2], policy.encode_prompts([PROMPTS[1]])[0])
    assert torch.equal(policy.decode(batch.latents[:, -1]), batch.images)
    assert not torch.equal(batch.latents[0], batch.latents[1])  # the K samples of a prompt differ
    other = policy.sample(PROMPTS[:2], k=1, seeds=[0, 1], prompt_ids=[5, 9], group_ids=[3, 4])
    assert torch.equal(other.prompt_ids, torch.tensor([5, 9])) and torch.equal(
        other.group_ids, torch.tensor([3, 4])
    )


def _batch_tolerances(policy, sample):
    """(latent atol, log-prob atol) for one sample compared across batch compositions: rounding
    only, derived in tests/numerics.py from the UNet's reductions, T, w and the values' scale."""
    sigma_min = float(policy.sigmas[policy.sigmas > 0].min())
    atol_x = sampler_atol(policy.unet, sample.latents, policy.num_steps, policy.guidance_scale)
    return atol_x, logprob_atol(sample.latents, sigma_min, sample.latents[0, 0].numel())


def test_default_seeds_come_from_the_seed_stream():
    a = DDIMPolicy(tiny_sd_components(), num_steps=2, guidance_scale=1.0, seed=3).sample(PROMPTS, k=2)
    b = DDIMPolicy(tiny_sd_components(), num_steps=2, guidance_scale=1.0, seed=3).sample(PROMPTS, k=2)
    c = DDIMPolicy(tiny_sd_components(), num_steps=2, guidance_scale=1.0).sample(PROMPTS, k=2)
    assert torch.equal(a.seeds, b.seeds) and torch.equal(a.latents, b.latents)
    assert len(set(a.seeds.tolist())) == 6 and not torch.equal(a.seeds, c.seeds)


def test_classifier_free_guidance_combines_conditional_and_empty_prompt(policy, batch):
    x_t, t = batch.latents[:2, 1], batch.timesteps[:2, 1]
    cond, uncond = batch.prompt_embeds[:2], batch.negative_embeds[:2]
    with torch.no_grad():
        eps_c = policy.unet(x_t, t, encoder_hidden_states=cond).sample
        eps_u = policy.unet(x_t, t, encoder_hidden_states=uncond).sample
        guided = policy.guided_output(x_t, t, cond, uncond)
    # one forward of 2B rows against two of B: rounding only, (1 + 2w) * sqrt(L n) u at the output's scale
    atol = (1 + 2 * 3.0) * network_rel_error(policy.unet) * float(guided.pow(2).mean().sqrt())
    torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c - eps_u), rtol=0, atol=atol)
    assert (eps_c - eps_u).abs().max() > 100 * atol  # the prompt matters far beyond that

    no_cfg = make_policy(guidance_scale=1.0)
    batch_sizes = []
    no_cfg.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    no_cfg.sample(PROMPTS[:2], k=1, seeds=[1, 2])
    assert batch_sizes == [2] * T  # one conditional forward of B per step, no unconditional half


def test_deterministic_steps_are_not_trainable_and_score_zero():
    eta0 = make_policy(eta=0.0)
    b = eta0.sample(PROMPTS[:1], k=2, seeds=[1, 2])
    assert eta0.trainable_steps().numel() == 0 and torch.equal(b.log_probs, torch.zeros(2, T))
    assert torch.equal(eta0.log_prob(b, torch.tensor([1, 2])), torch.zeros(2))

    to_one = DDIMPolicy(
        _with_scheduler(tiny_sd_components(), set_alpha_to_one=True), num_steps=T, guidance_scale=2.0
    )
    b = to_one.sample(PROMPTS[:1], k=2, seeds=[1, 2])
    assert torch.equal(to_one.trainable_steps(), torch.arange(T - 1))
    assert torch.equal(b.log_probs[:, -1], torch.zeros(2)) and (b.log_probs[:, :-1] != 0).all()
    assert torch.equal(
        to_one.trainable_steps(skip_first=1, skip_last=1), torch.tensor([1, 2])
    )  # counts schedule steps
    assert torch.equal(make_policy().trainable_steps(skip_first=1, skip_last=1), torch.tensor([1, 2]))


def _with_scheduler(components, **config):
    components.scheduler = DDIMScheduler.from_config(components.scheduler.config, **config)
    return components


def _directional_check(policy, batch, j, h=1e-4):
    """(autograd d logp / d theta . v, central finite difference) for one stored transition.

    h = 1e-4 along a unit direction: the O(h^2) error is ~1e-6 relative here, while at h <= 1e-6
    float64 rounding (amplified by 1 / sigma_t^2 and 1 / sqrt(abar_t)) already shows."""
    return directional_derivative(policy, batch, j, h)


@pytest.mark.parametrize("schedule", ["sd", "cosine_trailing"])
def test_policy_gradient_matches_finite_differences(schedule):
    """float64; first, a middle and the last trainable step. "cosine_trailing" starts at t=999 where
    abar_t ~ 2e-9 (the case where the first step's gradient is easiest to get wrong in sign)."""
    components = tiny_sd_components(seed=1)
    if schedule == "cosine_trailing":
        _with_scheduler(
            components, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", steps_offset=0
        )
    components.unet.double()
    policy = DDIMPolicy(components, num_steps=T, guidance_scale=2.0)
    if schedule == "cosine_trailing":
        assert policy.timesteps[0] == 999 and policy.scheduler.alphas_cumprod[999] < 1e-8
    transition = policy.sample(PROMPTS[1:2], k=1, seeds=[4])
    steps = policy.trainable_steps()
    for j in (steps[0].item(), steps[len(steps) // 2].item(), steps[-1].item()):
        autograd, finite_difference = _directional_check(policy, transition, j)
        assert abs(autograd) > 1e-8
        assert autograd == pytest.approx(finite_difference, rel=1e-4), f"step {j}"


def test_trainable_weights_round_trip_and_frozen_parts():
    policy = make_policy()
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())
    assert not any(p.requires_grad for p in policy.vae.parameters())
    assert not policy.text_encoder.training and not policy.vae.training
    assert len(policy.trainable_parameters()) == len(list(policy.unet.parameters()))
    state = policy.trainable_state_dict()
    assert state.keys() == policy.unet.state_dict().keys()
    other = make_policy(seed=5)
    assert not torch.equal(other.unet.conv_in.weight, policy.unet.conv_in.weight)
    other.load_trainable_state_dict(state)
    assert all(torch.equal(v, other.unet.state_dict()[k]) for k, v in state.items())
    with pytest.raises(KeyError):
        other.load_trainable_state_dict({k: v for k, v in state.items() if k != "conv_in.weight"})


def test_lora_adapters_are_the_only_synced_weights():
    from peft import LoraConfig

    policy, other = make_policy(), make_policy()
    for p in (policy, other):
        p.unet.add_adapter(
            LoraConfig(
                r=2,
                lora_alpha=2,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
    state = policy.trainable_state_dict()
    assert state and all("lora_" in k for k in state)
    names = {n for n, p in policy.unet.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert len(policy.trainable_parameters()) == len(names)
    other.load_trainable_state_dict(state)
    b = policy.sample(PROMPTS[:1], k=1, seeds=[3])
    torch.testing.assert_close(other.log_prob(b, torch.tensor([1])), b.log_probs[:, 1], rtol=0, atol=1e-6)


def test_build_policy_dispatches_on_the_config(monkeypatch):
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"kind": "tiny_sd", "seed": 2, "sample_dtype": "bf16", "lora_rank": 4},
            "sampling": {"num_steps": 3, "guidance_scale": 1.5, "eta": 0.7},
        }
    )
    calls = []
    fake_lora = types.ModuleType("loop_ray.diffusion.lora")
    fake_lora.add_lora = lambda unet, rank, alpha, **kw: calls.append((type(unet).__name__, rank, alpha))
    monkeypatch.setitem(sys.modules, "loop_ray.diffusion.lora", fake_lora)
    built = build_policy(cfg)
    assert calls == [("UNet2DConditionModel", 4, 4)]
    assert (built.num_steps, built.guidance_scale, built.eta) == (3, 1.5, 0.7)
    assert built.sample_dtype == torch.bfloat16 and len(built.timesteps) == 3
    assert torch.equal(built.unet.conv_in.weight, tiny_sd_components(seed=2).unet.conv_in.weight)


def test_tiny_stack_saves_and_loads_in_diffusers_layout(tmp_path, policy, batch):
    c = tiny_sd_components()
    pipe = StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        unet=c.unet,
        scheduler=c.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert loaded.tokenizer(PROMPTS).input_ids == c.tokenizer(PROMPTS).input_ids
    again = DDIMPolicy(tiny_sd_components(), num_steps=T, guidance_scale=3.0)
    again.unet, again.text_encoder, again.vae = loaded.unet, loaded.text_encoder.eval(), loaded.vae
    reloaded = again.sample([PROMPTS[1]], k=1, seeds=[13])
    # batch of 1 against row 3 of a batch of 6: equal up to rounding (tests/numerics.py)
    atol_x, _ = _batch_tolerances(policy, batch.select([3]))
    torch.testing.assert_close(reloaded.latents[0], batch.latents[3], rtol=0, atol=atol_x)
    assert (reloaded.latents[0] - batch.latents[2]).abs().max() > 100 * atol_x
