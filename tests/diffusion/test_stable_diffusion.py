"""Stable Diffusion stacks: save -> load by path -> sample -> one training step (full UNet and LoRA)
-> save -> reload with plain diffusers. A tiny random SD-shaped stack of the real classes; no
download."""

from __future__ import annotations

import pytest
import torch

from loop_ray.diffusion.ddim.policy import DDIMPolicy
from loop_ray.diffusion.ddim.stable_diffusion import load_components, save_pretrained
from loop_ray.diffusion.ddim.tiny import tiny_sd_components
from loop_ray.diffusion.lora import add_lora, has_lora, lora_state_dict, merged_state_dict

torch.set_num_threads(1)

PROMPTS = ["a red circle", "a blue square"]
STEPS, K = 3, 2


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd")
    components = tiny_sd_components(seed=0)
    save_pretrained(components, folder)
    return folder, components


def _policy(components):
    return DDIMPolicy(components, num_steps=STEPS, guidance_scale=3.0, eta=1.0)


def _train_one_step(policy, batch):
    """One AdamW step on -mean(A * exp(logp - logp_old)) at one DDIM step per sample."""
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    steps = torch.arange(len(batch)) % STEPS
    logp = policy.log_prob(batch, steps)
    old = batch.log_probs[torch.arange(len(batch)), steps]
    torch.testing.assert_close(logp.detach(), old, rtol=1e-4, atol=1e-3)  # ratio 1 before the update
    advantages = torch.linspace(-1.0, 1.0, len(batch))
    loss = -(advantages * torch.exp(logp - old)).mean()
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return steps


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    e = torch.randn(2, 32, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=e).sample


def test_load_by_path_matches_what_was_saved(saved_base):
    folder, original = saved_base
    loaded = load_components(str(folder))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    for key in ("beta_schedule", "beta_start", "beta_end", "steps_offset", "prediction_type", "set_alpha_to_one"):
        assert loaded.scheduler.config[key] == original.scheduler.config[key], key
    assert loaded.tokenizer(PROMPTS).input_ids == original.tokenizer(PROMPTS).input_ids
    # sampling with the loaded stack reproduces the original's trajectories seed for seed
    seeds = [11, 12, 13, 14]
    a = _policy(original).sample(PROMPTS, K, seeds)
    b = _policy(loaded).sample(PROMPTS, K, seeds)
    torch.testing.assert_close(a.latents, b.latents)
    assert a.images.dtype == torch.uint8 and a.images.shape == (4, 16, 16, 3)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_sample_train_save_reload_with_plain_diffusers(saved_base, tmp_path, lora_rank):
    from diffusers import StableDiffusionPipeline

    folder, _ = saved_base
    components = load_components(str(folder))
    if lora_rank:
        add_lora(components.unet, lora_rank, alpha=8)
    policy = _policy(components)
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    batch = policy.sample(PROMPTS, K, seeds=[1, 2, 3, 4])
    assert batch.latents.shape == (4, STEPS + 1, 4, 8, 8) and batch.log_probs.shape == (4, STEPS)
    steps = _train_one_step(policy, batch)

    after = components.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if lora_rank:
        assert changed and all("lora_" in k for k in changed)  # the base UNet is frozen
        assert any("lora_B" in k for k in changed)
        assert all(p.requires_grad == ("lora_" in n) for n, p in components.unet.named_parameters())
    else:
        assert len(changed) > 0.9 * len(before)
    with torch.no_grad():
        new_logp = policy.log_prob(batch, steps)
    assert not torch.allclose(new_logp, batch.log_probs[torch.arange(4), steps])

    out = save_pretrained(components, tmp_path / "ckpt")
    assert has_lora(components.unet) == bool(lora_rank)  # saving did not merge or strip the live adapters
    assert all(torch.equal(after[k], v) for k, v in components.unet.state_dict().items())
    pipe = StableDiffusionPipeline.from_pretrained(out)  # plain diffusers, no loop-ray code
    assert pipe.safety_checker is None and not has_lora(pipe.unet)
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(components.unet), rtol=1e-4, atol=1e-4)
    image = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3)
    # and loop-ray loads it back to the same trained policy
    reloaded = _policy(load_components(str(out)))
    torch.testing.assert_close(reloaded.log_prob(batch, steps).detach(), new_logp, rtol=1e-4, atol=1e-3)


def test_add_lora_freezes_base_and_merge_is_exact():
    components = tiny_sd_components(seed=1)
    unet = components.unet
    reference = _unet_out(unet)
    add_lora(unet, 2)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    targets = {n.split(".lora_")[0] for n in trainable}
    assert any(t.endswith("to_q") for t in targets) and any(t.endswith("to_out.0") for t in targets)
    torch.testing.assert_close(_unet_out(unet), reference)  # B = 0: a fresh adapter changes nothing
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adapted = _unet_out(unet)
    assert not torch.allclose(adapted, reference, atol=1e-3)
    live = {k: v.clone() for k, v in unet.state_dict().items()}
    merged = merged_state_dict(unet)
    assert all(torch.equal(live[k], v) for k, v in unet.state_dict().items())  # not mutated
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    plain = tiny_sd_components(seed=2).unet
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(_unet_out(plain), adapted, rtol=1e-4, atol=1e-4)
    assert len(lora_state_dict(unet)) == len(trainable)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(unet, 2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(tiny_sd_components(seed=3).unet, 0)


def test_missing_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder .*nowhere.*put a diffusers Stable Diffusion folder"):
        load_components(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nor in the local Hugging Face cache.*huggingface-cli download "
                                                "stabilityai/stable-diffusion-2-base"):
        load_components("stabilityai/stable-diffusion-2-base")
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="missing vae/, text_encoder/, tokenizer/, scheduler/"):
        load_components(str(tmp_path / "partial"))
    toy = tiny_sd_components(seed=0)
    toy.vae = None
    with pytest.raises(ValueError, match="no VAE"):
        save_pretrained(toy, tmp_path / "out")
