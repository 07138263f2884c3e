"""What every policy kind promises the sampler and the learner, checked on each (DDIM on the tiny SD
stack, flow on tiny SD3 and FLUX stacks): a sample depends only on its prompt, seed and weights;
recomputed log-probs give ratio 1 at every trainable step; the network may be wrapped by an engine
(`.module`) and the policy still scores and samples."""

import pytest
import torch
from numerics import logprob_atol, sampler_atol

from loop_ray.diffusion.ddim.policy import DDIMPolicy
from loop_ray.diffusion.ddim.tiny import tiny_sd_components
from loop_ray.diffusion.flow.models import tiny_flux_components, tiny_sd3_components
from loop_ray.diffusion.flow.policy import FlowPolicy

torch.set_num_threads(1)

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle"]
T = 4
KINDS = ("ddim", "sd3", "flux")


def make_policy(kind: str):
    if kind == "ddim":
        return DDIMPolicy(tiny_sd_components(), num_steps=T, guidance_scale=3.0, eta=1.0)
    builder, guidance = {"sd3": (tiny_sd3_components, 4.5), "flux": (tiny_flux_components, 3.5)}[kind]
    return FlowPolicy(builder(0), num_steps=T, noise_level=0.7, sde="sde", resolution=16, max_sequence_length=8,
                      guidance_scale=guidance)


def guidance_gain(policy) -> float:
    """The guidance scale to give `sampler_atol`: two-pass CFG (DDIM, SD3) multiplies the network's
    rounding by it; FLUX's distilled guidance is one input, no second pass."""
    return 1.0 if getattr(policy, "kind", None) == "flux" else policy.guidance_scale


@pytest.fixture(scope="module", params=KINDS)
def policy(request):
    return make_policy(request.param)


@pytest.fixture(scope="module")
def batch(policy):
    return policy.sample(PROMPTS, k=2, seeds=[10, 11, 12, 13, 14, 15], version=7)


def test_a_sample_depends_only_on_prompt_seed_and_weights(policy, batch):
    """Row 3 (prompt 1, seed 13) alone and inside another batch composition chunked by 2: equal up to
    float32 rounding (another batch may take other CPU kernels; tolerances from tests/numerics.py);
    another seed, or another prompt with the same seed (a mixed-up row), lands far outside them."""
    sample = batch.select([3])
    atol_x = sampler_atol(policy.unet, sample.latents, T, guidance_gain(policy))
    sigma_min = float(policy.sigmas[policy.sigmas > 0].min())
    atol_logp = logprob_atol(sample.latents, sigma_min, sample.latents[0, 0].numel())
    alone = policy.sample([PROMPTS[1]], k=1, seeds=[13])
    mixed = policy.sample([PROMPTS[2], PROMPTS[1], PROMPTS[0]], k=1, seeds=[99, 13, 5], batch_size=2)
    for other, row in ((alone, 0), (mixed, 1)):
        torch.testing.assert_close(other.latents[row], batch.latents[3], rtol=0, atol=atol_x)
        torch.testing.assert_close(other.log_probs[row], batch.log_probs[3], rtol=0, atol=atol_logp)
        assert (other.images[row].int() - batch.images[3].int()).abs().max() <= 1
    reseeded = policy.sample([PROMPTS[1]], k=1, seeds=[14])
    assert (reseeded.latents[0] - batch.latents[3]).abs().max() > 100 * atol_x
    assert (reseeded.log_probs[0] - batch.log_probs[3]).abs().max() > 10 * atol_logp
    other_prompt = policy.sample([PROMPTS[0]], k=1, seeds=[13])  # the same initial noise, another prompt
    assert (other_prompt.latents[0, 1:] - batch.latents[3, 1:]).abs().max() > 10 * atol_x


def test_recomputed_log_probs_give_ratio_one_at_every_trainable_step(policy, batch):
    steps = policy.trainable_steps()
    assert torch.equal(steps, torch.arange(T))
    for j in steps.tolist():
        logp = policy.log_prob(batch, torch.full((len(batch),), j))
        assert logp.requires_grad
        assert (torch.exp(logp - batch.log_probs[:, j]) - 1).abs().max() <= 1e-6
    chosen = torch.stack([torch.randperm(T, generator=torch.Generator().manual_seed(i)) for i in range(len(batch))])
    logp = policy.log_prob(batch, chosen[:, :2])  # [B, n]: two steps per sample
    assert logp.shape == (len(batch), 2)
    assert (torch.exp(logp - batch.log_probs.gather(1, chosen[:, :2])) - 1).abs().max() <= 1e-6


class EngineLike(torch.nn.Module):
    """Stands for a DeepSpeed engine: holds the network as `.module` and forwards calls to it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_the_network_can_be_wrapped_by_an_engine(kind):
    policy = make_policy(kind)
    batch = policy.sample(PROMPTS, k=2, seeds=[10, 11, 12, 13, 14, 15])
    wrapped = make_policy(kind)
    wrapped.unet = EngineLike(wrapped.unet)  # what the learner does (`unet` holds a UNet or a transformer)
    assert wrapped.trainable_state_dict().keys() == policy.unet.state_dict().keys()
    logp = wrapped.log_prob(batch, torch.full((len(batch),), 2))
    assert (torch.exp(logp - batch.log_probs[:, 2]) - 1).abs().max() <= 1e-6
    assert wrapped.sample(PROMPTS[:1], seeds=[1]).latents.shape == (1, *batch.latents.shape[1:])
