"""A per-channel gain on the output of every text cross-attention layer (`model.trainable:
condition_gain`): a few hundred parameters through which the prompt's influence on the network
can be turned up or down, layer by layer, channel by channel.

Classifier-free guidance, eps_u + w (eps_c - eps_u), amplifies what the text contributes to the
prediction; in a network whose only access to the text is cross-attention, a gain gamma on each
cross-attention output, o' = gamma * (W h + b), is a low-dimensional way to move in that direction.
A policy-gradient estimate's noise grows with the number of trained parameters, while a gain that
scales a whole layer's text contribution collects the reward signal of all of its weights, so this
subset is the small end of the trainable-subset lever (beside `cross_attention` and LoRA).

The gains start at 1 (the pre-trained network unchanged). They live in the network's state dict as
`<attention>.condition_gain` and are applied by a forward hook on the layer's output projection
`to_out[0]`; `merged_state_dict` folds them into that projection (W' = diag(gamma) W, b' = gamma b)
for a plain diffusers model.
"""

from __future__ import annotations

import torch

GAIN = "condition_gain"


def _cross_attentions(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(name, sub) for name, sub in module.named_modules() if getattr(sub, "is_cross_attention", False)]


def _apply_gain(projection: torch.nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
    return output * projection.condition_gain_owner.condition_gain.to(output.dtype)


def add_condition_gain(module: torch.nn.Module) -> int:
    """Give every cross-attention layer of `module` a gain [out features] of ones and train only the
    gains (every other parameter frozen); returns the number of gain parameters. ValueError when the
    network has no cross-attention layer."""
    layers = _cross_attentions(module)
    if not layers:
        raise ValueError("model.trainable=condition_gain: the network has no cross-attention layer")
    for p in module.parameters():
        p.requires_grad_(False)
    total = 0
    for _, attention in layers:
        projection = attention.to_out[0]
        gain = torch.nn.Parameter(torch.ones(projection.out_features, device=projection.weight.device))
        attention.register_parameter(GAIN, gain)
        object.__setattr__(projection, "condition_gain_owner", attention)  # not a submodule: no cycle
        projection.register_forward_hook(_apply_gain)
        total += gain.numel()
    return total


def has_condition_gain(module: torch.nn.Module) -> bool:
    return any(name.endswith(f".{GAIN}") or name == GAIN for name, _ in module.named_parameters())


def merged_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a plain network: each gain folded into its layer's output projection
    (W' = diag(gamma) W, b' = gamma b) and the gain keys left out; CPU copies, the live module
    untouched."""
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if not k.endswith(GAIN)}
    for name, attention in _cross_attentions(module):
        gain = getattr(attention, GAIN, None)
        if gain is None:
            continue
        gain = gain.detach().cpu().float()
        prefix = f"{name}.to_out.0"
        weight = state[f"{prefix}.weight"]
        state[f"{prefix}.weight"] = (gain[:, None] * weight.float()).to(weight.dtype)
        if f"{prefix}.bias" in state:
            bias = state[f"{prefix}.bias"]
            state[f"{prefix}.bias"] = (gain * bias.float()).to(bias.dtype)
    return state
