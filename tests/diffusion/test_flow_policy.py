"""FlowPolicy on tiny SD3 and FLUX stacks: the diffusers pipelines retraced at a = 0, stored records,
CPS steps, stochastic windows and group branching, gradients, trainable weights, dispatch from the
config, the KL to the reference (what every policy kind shares: tests/diffusion/test_policy_contract.py)."""

import pytest
import torch
from numerics import directional_derivative, sampler_atol

from loop_ray.config import ExperimentConfig
from loop_ray.diffusion.factory import build_policy
from loop_ray.diffusion.flow.models import pipeline_class, tiny_flux_components, tiny_sd3_components
from loop_ray.diffusion.flow.policy import FlowPolicy
from loop_ray.diffusion.flow.text import unpack_latents

torch.set_num_threads(1)

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle"]
T = 4
GUIDANCE = {"sd3": 4.5, "flux": 3.5}
BUILDERS = {"sd3": tiny_sd3_components, "flux": tiny_flux_components}


def make_policy(kind, noise_level=0.7, sde="sde", seed=0, **kwargs):
    kwargs.setdefault("guidance_scale", GUIDANCE[kind])
    return FlowPolicy(BUILDERS[kind](seed), num_steps=T, noise_level=noise_level, sde=sde, resolution=16,
                      max_sequence_length=8, **kwargs)


def cfg_gain(policy):
    """The guidance scale to give `sampler_atol`: SD3's two-pass CFG, none for FLUX's distilled guidance."""
    return policy.guidance_scale if policy.kind == "sd3" else 1.0


@pytest.fixture(scope="module", params=["sd3", "flux"])
def policy(request):
    return make_policy(request.param)


@pytest.fixture(scope="module")
def batch(policy):
    return policy.sample(PROMPTS, k=2, seeds=[10, 11, 12, 13, 14, 15], version=3)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_noise_level_zero_retraces_the_diffusers_pipeline(kind):
    policy = make_policy(kind, noise_level=0.0)
    ours = policy.sample([PROMPTS[0]], k=2, seeds=[5, 6])
    pipe = pipeline_class(kind)(**policy.components.pipeline_modules())
    pipe.set_progress_bar_config(disable=True)
    run = {"num_inference_steps": T, "height": 16, "width": 16, "guidance_scale": GUIDANCE[kind],
           "max_sequence_length": 8, "generator": [torch.Generator().manual_seed(s) for s in (5, 6)]}
    latents = pipe([PROMPTS[0]] * 2, output_type="latent", **run).images
    if kind == "flux":
        latents = unpack_latents(latents, 8, 8)
    atol = sampler_atol(policy.transformer, ours.latents, T, cfg_gain(policy))
    torch.testing.assert_close(ours.latents[:, -1], latents, rtol=0, atol=atol)
    run["generator"] = [torch.Generator().manual_seed(s) for s in (5, 6)]
    images = pipe([PROMPTS[0]] * 2, output_type="np", **run).images  # decoded with scaling and shift factor
    assert (ours.images.int() - torch.from_numpy(images * 255).round().int()).abs().max() <= 1
    assert torch.equal(ours.log_probs, torch.zeros(2, T)) and policy.trainable_steps().numel() == 0


def test_sample_record(policy, batch):
    B = len(PROMPTS) * 2
    assert batch.latents.shape == (B, T + 1, 4, 8, 8) and batch.images.shape == (B, 16, 16, 3)
    assert batch.log_probs.shape == (B, T) and torch.isfinite(batch.log_probs).all() and (batch.log_probs != 0).all()
    torch.testing.assert_close(batch.timesteps[0], policy.schedule[:-1] * 1000)
    assert batch.sde_mask.all() and batch.version == 3 and torch.equal(batch.seeds, torch.arange(10, 16))
    assert torch.equal(policy.decode(batch.latents[:, -1]), batch.images)
    assert not torch.equal(batch.latents[0], batch.latents[1])
    if policy.kind == "sd3":  # two-pass CFG: the empty prompt's sequence and pooled embeddings are stored
        assert batch.prompt_embeds.shape == batch.negative_embeds.shape == (B, 16 + 8, 32)
        assert batch.pooled_embeds.shape == batch.negative_pooled_embeds.shape == (B, 32)
        assert torch.equal(batch.negative_pooled_embeds[0], batch.negative_pooled_embeds[5])
    else:  # guidance-distilled FLUX: no negative prompt at all
        assert batch.prompt_embeds.shape == (B, 8, 32) and batch.pooled_embeds.shape == (B, 16)
        assert batch.negative_embeds is None and batch.negative_pooled_embeds is None
    assert not torch.equal(batch.pooled_embeds[0], batch.pooled_embeds[2])


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_cps_steps_give_ratio_one_and_a_deterministic_last_step(kind):
    policy = make_policy(kind, noise_level=0.8, sde="cps")
    b = policy.sample(PROMPTS[:2], k=2, seeds=[1, 2, 3, 4])
    assert torch.equal(policy.trainable_steps(), torch.arange(T - 1))  # s' = 0: no fresh noise at the end
    assert torch.equal(b.log_probs[:, -1], torch.zeros(4)) and (b.log_probs[:, :-1] != 0).all()
    for j in range(T - 1):
        logp = policy.log_prob(b, torch.full((4,), j))
        assert (torch.exp(logp - b.log_probs[:, j]) - 1).abs().max() <= 1e-6


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_stochastic_window_and_branching_groups(kind):
    """MixGRPO / Flow-GRPO-Fast: only steps 1-2 stochastic. Branch: a group shares x_T and the
    deterministic step 0, parts at step 1; steps outside the window store log-prob 0, the ODE step's
    latents, and are not trained; the window's steps recompute to ratio 1."""
    policy = make_policy(kind)
    b = policy.sample(PROMPTS[:2], k=3, seeds=list(range(20, 26)), sde_steps=[1, 2], group_noise="branch")
    assert torch.equal(b.sde_mask[0], torch.tensor([False, True, True, False]))
    for g in (0, 3):
        assert torch.equal(b.latents[g, :2], b.latents[g + 1, :2]) and torch.equal(b.latents[g, :2], b.latents[g + 2, :2])
        assert not torch.equal(b.latents[g, 2], b.latents[g + 1, 2])
    assert torch.equal(b.log_probs[:, [0, 3]], torch.zeros(6, 2)) and (b.log_probs[:, 1:3] != 0).all()
    assert torch.equal(policy.trainable_steps_of(b), torch.tensor([[1, 2]] * 6))
    for j in (1, 2):
        logp = policy.log_prob(b, torch.full((6,), j))
        assert (torch.exp(logp - b.log_probs[:, j]) - 1).abs().max() <= 1e-6
    # the deterministic steps are the a = 0 sampler's: x_T of the group's first seed, then the ODE step
    ode = make_policy(kind, noise_level=0.0).sample([PROMPTS[0]], k=1, seeds=[20])
    atol = sampler_atol(policy.transformer, ode.latents, 1, cfg_gain(policy))
    torch.testing.assert_close(b.latents[1, :2], ode.latents[0, :2], rtol=0, atol=atol)




@pytest.mark.parametrize("kind, h, rel", [("sd3", 1e-4, 1e-4), ("flux", 1e-2, 1e-3)])
def test_policy_gradient_matches_finite_differences_float64(kind, h, rel):
    """Through the transformer (FLUX: packing, position ids, guidance embedding) at the first (s = 1),
    a middle and the last step. The FLUX transformer applies its rotary embedding in float32 even in a
    float64 model (diffusers' apply_rotary_emb), so its log-prob carries float32 rounding: a step of
    h = 1e-2 keeps that noise (~u / h) and the O(h^2) error below 1e-4 relative."""
    components = BUILDERS[kind](seed=1)
    components.transformer.double()
    policy = FlowPolicy(components, num_steps=T, guidance_scale=GUIDANCE[kind], noise_level=0.7, resolution=16,
                        max_sequence_length=8)
    transition = policy.sample(PROMPTS[1:2], k=1, seeds=[4])
    for j in (0, T // 2, T - 1):
        autograd, finite_difference = directional_derivative(policy, transition, j, h)
        assert abs(autograd) > 1e-8
        assert autograd == pytest.approx(finite_difference, rel=rel), f"step {j}"


def _cfg(kind, **model):
    return ExperimentConfig.model_validate({
        "model": {"kind": kind, "max_sequence_length": 8, **model},
        "sampling": {"num_steps": 3, "guidance_scale": 2.0, "flow_sde": "cps", "flow_noise_level": 0.5},
    })


@pytest.mark.parametrize("kind", ["tiny_sd3", "tiny_flux"])
def test_build_policy_lora_and_trainable_weights_round_trip(kind):
    policy = build_policy(_cfg(kind, lora_rank=4, seed=2))
    assert isinstance(policy, FlowPolicy) and policy.kind == kind.removeprefix("tiny_")
    assert (policy.num_steps, policy.guidance_scale, policy.eta, policy.sde) == (3, 2.0, 0.5, "cps")
    assert policy.height == policy.width == 8 and policy.max_sequence_length == 8
    assert not any(p.requires_grad for m in policy.components.text_encoders() for p in m.parameters())
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    state = policy.trainable_state_dict()
    assert state.keys() == {n for n in policy.transformer.state_dict() if "lora_" in n}
    with torch.no_grad():
        for n, p in policy.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    torch.manual_seed(123)  # the adapters' init does not depend on the caller's RNG (every process agrees)
    other = build_policy(_cfg(kind, lora_rank=4, seed=2))
    fresh = build_policy(_cfg(kind, lora_rank=4, seed=2)).transformer.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in other.transformer.state_dict().items())
    b = policy.sample(PROMPTS[:1], k=2, seeds=[1, 2])
    assert (other.log_prob(b, torch.tensor([0, 1])) - b.log_probs[:, :2].diagonal()).abs().max() > 1e-4
    other.load_trainable_state_dict(policy.trainable_state_dict())
    torch.testing.assert_close(other.log_prob(b, torch.tensor([0, 1])).detach(), b.log_probs[:, :2].diagonal(),
                               rtol=0, atol=1e-6)
    full = build_policy(_cfg(kind))
    assert full.trainable_state_dict().keys() == full.transformer.state_dict().keys()


def test_the_kl_to_the_reference_is_the_gaussian_kl_of_the_sde_means(policy, batch):
    """`algorithm.kl_beta` on a flow policy: KL = mean_d (mu_theta - mu_ref)^2 / (2 sigma_s^2), with
    the means of the SDE step (zero noise) and sigma_s the step's std (`policy.sigmas`)."""
    import copy

    steps = torch.tensor([0, 1, 2, 0, 1, 2])
    state = copy.deepcopy(policy.unet.state_dict())
    policy.keep_reference()
    try:
        assert torch.equal(policy.log_prob_and_reference_kl(batch, steps)[1], torch.zeros(len(batch)))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in policy.unet.parameters():
                p.add_(0.2 * p.abs().mean() * torch.randn(p.shape, generator=g))
        logp, kl = policy.log_prob_and_reference_kl(batch, steps)
        assert torch.equal(logp.detach(), policy.log_prob(batch, steps).detach())
        x_t, _, idx, cond = policy._stored_transitions(batch, steps[:, None])
        with torch.no_grad():
            mu = policy._transition(idx, policy._model_output(x_t, idx, cond), x_t, policy.eta,
                                    noise=torch.zeros_like(x_t))[0].double()
            reference, policy.unet = policy.unet, policy._reference
            mu_ref = policy._transition(idx, policy._model_output(x_t, idx, cond), x_t, policy.eta,
                                        noise=torch.zeros_like(x_t))[0].double()
            policy.unet = reference
        sigma = policy.sigmas[idx].double()
        expected = ((mu - mu_ref) ** 2).flatten(1).mean(1) / (2 * sigma**2)
        # a difference of two float32 log-densities of size |log sigma| + 0.92 (4u each), plus the
        # float32 rounding of the means relative to their difference
        tol = 4 * 2**-24 * (sigma.log().abs() + 0.92) + 1e-3 * expected
        assert (expected > 100 * tol).all() and ((kl.double() - expected).abs() <= tol).all()
    finally:
        policy.unet.load_state_dict(state)
        del policy._reference
