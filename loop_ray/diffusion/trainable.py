"""Which parameters of the denoiser train (`model.trainable`, `model.freeze`).

The policy gradient of a small model concentrates in a few output-layer directions where a step,
true or noise, costs reward (docs/results.md: the gradient diagnostic on the embedded world), while attribute binding lives in how the text
conditions the image. These options let a run train only part of the network:

- `trainable: all` (the paper): every parameter; `cross_attention`: only the attention layers
  that attend to the text (diffusers `Attention` modules with `is_cross_attention`);
  `condition_gain`: only a per-channel gain on each of those layers' outputs, added for the purpose
  (loop_ray.diffusion.condition_gain).
- `freeze`: parameter-name prefixes (e.g. `conv_out`, `conv_norm_out`, `up_blocks.2`) frozen on top.

LoRA (`model.lora_rank > 0`) is the other way to train a subset; peft freezes the base weights.
"""

from __future__ import annotations

import torch


def select_trainable(module: torch.nn.Module, trainable: str = "all", freeze: list[str] | tuple = ()) -> int:
    """Set requires_grad on `module`'s parameters; returns how many elements train. ValueError when a
    `freeze` prefix matches no parameter or nothing is left to train."""
    if trainable == "condition_gain":
        from loop_ray.diffusion.condition_gain import add_condition_gain

        add_condition_gain(module)
    names = [n for n, _ in module.named_parameters()]
    if trainable == "condition_gain":
        keep = {n for n in names if n.endswith(".condition_gain")}
    elif trainable == "cross_attention":
        keep = set()
        for prefix, sub in module.named_modules():
            if getattr(sub, "is_cross_attention", False):
                keep.update(f"{prefix}.{n}" for n, _ in sub.named_parameters())
        if not keep:
            raise ValueError("model.trainable=cross_attention: the network has no cross-attention layer")
    elif trainable == "all":
        keep = set(names)
    else:
        raise ValueError(f"model.trainable={trainable!r}: expected all, cross_attention or condition_gain")
    for prefix in freeze:
        matched = {n for n in names if n == prefix or n.startswith(prefix + ".")}
        if not matched:
            raise ValueError(f"model.freeze: {prefix!r} names no parameter of the network")
        keep -= matched
    total = 0
    for name, p in module.named_parameters():
        p.requires_grad_(name in keep)
        total += p.numel() if name in keep else 0
    if total == 0:
        raise ValueError("model.trainable / model.freeze leave no parameter to train")
    return total
