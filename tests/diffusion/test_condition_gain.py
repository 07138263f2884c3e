"""The condition-gain subset: gains of one change nothing, only the gains train, a gain scales its
layer's output exactly, and the merged plain network computes what the gained one does."""

import torch
from numerics import network_rel_error

from loop_ray.config import config_from_dict
from loop_ray.diffusion.condition_gain import has_condition_gain, merged_state_dict
from loop_ray.diffusion.ddim.stable_diffusion import plain_unet
from loop_ray.diffusion.ddim.tiny import tiny_sd_components
from loop_ray.diffusion.factory import build_policy
from loop_ray.diffusion.trainable import select_trainable

torch.set_num_threads(1)


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 32, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([500, 20]), text


def test_gains_start_at_one_and_only_they_train():
    unet = tiny_sd_components().unet
    x, t, text = _inputs(unet)
    before = unet(x, t, encoder_hidden_states=text).sample
    n = select_trainable(unet, "condition_gain")
    attn = [m for m in unet.modules() if getattr(m, "is_cross_attention", False)]
    assert n == sum(m.to_out[0].out_features for m in attn) > 0 and has_condition_gain(unet)
    assert {name.rsplit(".", 1)[-1] for name, p in unet.named_parameters() if p.requires_grad} == {"condition_gain"}
    assert torch.equal(unet(x, t, encoder_hidden_states=text).sample, before)  # x * 1.0 is exact


def test_a_gain_scales_its_layer_output_and_merging_reproduces_it():
    unet = tiny_sd_components().unet
    select_trainable(unet, "condition_gain")
    attn = next(m for m in unet.modules() if getattr(m, "is_cross_attention", False))
    seen = {}

    def record(_module, _inputs, output):  # runs after the gain's hook: sees the gained output
        seen["out"] = output.detach().clone()

    handle = attn.to_out[0].register_forward_hook(record)
    h = torch.randn(3, 5, attn.to_out[0].in_features)
    plain_out = torch.nn.functional.linear(h, attn.to_out[0].weight, attn.to_out[0].bias)
    with torch.no_grad():
        attn.condition_gain.copy_(torch.linspace(0.5, 2.0, attn.condition_gain.numel()))
    attn.to_out[0](h)
    torch.testing.assert_close(seen["out"], plain_out * attn.condition_gain.detach(), rtol=0, atol=0)
    handle.remove()
    with torch.no_grad():
        for m in unet.modules():
            if hasattr(m, "condition_gain"):
                m.condition_gain.uniform_(0.5, 1.5)
    x, t, text = _inputs(unet, 1)
    gained = unet(x, t, encoder_hidden_states=text).sample
    plain = plain_unet(unet)
    assert not has_condition_gain(plain) and set(merged_state_dict(unet)) == set(plain.state_dict())
    merged = plain(x, t, encoder_hidden_states=text).sample
    # (W h) g and (diag(g) W) h differ by the float32 rounding of one forward (tests/numerics.py:
    # sqrt(L n) u relative), at the output's scale, with a factor 4 for the two orders' roundings
    tol = 4 * network_rel_error(unet) * float(gained.detach().abs().max())
    assert float((merged - gained).detach().abs().max()) <= tol
    assert not torch.equal(merged, plain_unet(tiny_sd_components().unet)(x, t, encoder_hidden_states=text).sample)


def test_policy_with_condition_gain_learns_only_gains_and_round_trips_its_weights():
    cfg = config_from_dict({"model": {"kind": "tiny_sd", "trainable": "condition_gain"},
                            "sampling": {"num_steps": 2, "guidance_scale": 1.0}})
    policy = build_policy(cfg)
    params = policy.trainable_parameters()
    assert all(p.numel() < 100 for p in params) and sum(p.numel() for p in params) > 0
    batch = policy.sample(["a red circle"], 2, [1, 2])
    loss = policy.log_prob(batch, torch.tensor([0, 0])).sum()
    grads = torch.autograd.grad(loss, params)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    state = policy.trainable_state_dict()
    assert all(k.endswith("condition_gain") for k in state)
    other = build_policy(cfg)
    state = {k: v * 1.5 for k, v in state.items()}
    other.load_trainable_state_dict(state)
    assert all(torch.equal(v, other.trainable_state_dict()[k]) for k, v in state.items())
