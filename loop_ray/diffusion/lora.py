"""LoRA adapters on the UNet's attention projections (Hu et al., 2021), through peft.

For each targeted linear layer y = W x + b the adapter adds a low-rank update:

    y = W x + b + (alpha / r) * B A x,     A: [r, in], B: [out, r]

with A drawn from a Gaussian and B = 0, so a fresh adapter leaves the model unchanged. The base
weights W, b (and every other UNet parameter) are frozen; only A and B require grad. The adapters
are injected in place with diffusers' peft integration (`unet.add_adapter`), so the UNet keeps its
class and call signature and a DeepSpeed engine or the policy can wrap it as before.
"""

from __future__ import annotations

import torch

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections of every (cross-)attention


def add_lora(
    unet: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    *,
    target_modules: tuple[str, ...] = LORA_TARGETS,
    dropout: float = 0.0,
    adapter_name: str = "default",
    seed: int = 0,
) -> torch.nn.Module:
    """Freeze `unet` and add rank-`rank` LoRA adapters (scale alpha / rank, alpha defaults to rank)
    on `target_modules`; returns the same module, whose only trainable parameters are the adapters.
    The Gaussian A matrices are drawn from torch seed `seed` (the caller's RNG is left as it was), so
    every process that builds the policy (samplers, learner ranks, a resumed run) gets the same ones."""
    from peft import LoraConfig

    if int(rank) < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if has_lora(unet):
        raise ValueError("the UNet already has LoRA adapters")
    unet.requires_grad_(False)
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha) if alpha is not None else float(rank),
        lora_dropout=float(dropout),
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=adapter_name)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"no module of the UNet matched the LoRA targets {list(target_modules)}")
    if any("lora_" not in n for n in trainable):
        raise RuntimeError(f"non-adapter parameters left trainable: {[n for n in trainable if 'lora_' not in n][:5]}")
    return unet


def has_lora(module: torch.nn.Module) -> bool:
    """True if peft LoRA layers are injected anywhere in `module`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only (keys containing "lora_"), detached CPU copies."""
    return {k: v.detach().cpu().clone() for k, v in unet.state_dict().items() if "lora_" in k}


@torch.no_grad()
def merged_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's state dict with every active LoRA update folded into its base weight,
    W' = W + (alpha / r) B A, under the plain (adapter-free) key names; CPU copies. The live module
    is not modified. Without adapters this is just a CPU copy of the state dict."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {k: v.detach().cpu().clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    for name, module in unet.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        key = f"{name}.base_layer.weight"
        if key not in state:
            raise KeyError(f"LoRA layer {name} has no base weight {key} in the state dict")
        if not module.merged and not module.disable_adapters:
            weight = state[key]
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = module.get_delta_weight(adapter).detach().cpu()
                    weight = (weight.float() + delta.float()).to(weight.dtype)
            state[key] = weight
    renamed = {}
    for key, value in state.items():
        renamed[key.replace(".base_layer.", ".")] = value
    return renamed
