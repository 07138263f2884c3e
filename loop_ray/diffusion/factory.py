"""`build_policy`: the policy of an experiment config. A leaf: it imports the model families, and
nothing in loop_ray.diffusion imports it."""

from __future__ import annotations

import torch

from loop_ray.diffusion.kinds import FLOW_MODEL_KINDS, SAMPLE_DTYPES
from loop_ray.diffusion.policy_base import PolicyBase


def build_policy(cfg, device: str | torch.device = "cpu") -> PolicyBase:
    """The policy of an ExperimentConfig: model stack by `cfg.model.kind` (a flow kind gives a
    FlowPolicy, the others a DDIMPolicy), LoRA adapters if `cfg.model.lora_rank > 0`, sampling
    settings from `cfg.sampling`."""
    kind = cfg.model.kind
    if kind in FLOW_MODEL_KINDS:
        from loop_ray.diffusion.flow.policy import build_flow_policy

        return build_flow_policy(cfg, device)
    from loop_ray.diffusion.ddim.policy import DDIMPolicy

    if kind == "tiny_sd":
        from loop_ray.diffusion.ddim.tiny import tiny_sd_components

        components = tiny_sd_components(cfg.model.seed)
    elif kind == "toy":
        from loop_ray.toy.model import load_toy_components

        components = load_toy_components(cfg.model.path)
    elif kind == "stable_diffusion":
        from loop_ray.diffusion.ddim.stable_diffusion import load_components

        components = load_components(cfg.model.path, revision=cfg.model.revision)
    else:
        raise ValueError(f"model.kind={kind!r}: expected toy, stable_diffusion, tiny_sd or a flow kind {FLOW_MODEL_KINDS}")
    if cfg.model.lora_rank > 0:
        from loop_ray.diffusion.lora import add_lora

        alpha = cfg.model.lora_alpha if cfg.model.lora_alpha is not None else cfg.model.lora_rank
        add_lora(components.unet, cfg.model.lora_rank, alpha, seed=cfg.seed)
    elif cfg.model.trainable != "all" or cfg.model.freeze:
        from loop_ray.diffusion.trainable import select_trainable

        select_trainable(components.unet, cfg.model.trainable, cfg.model.freeze)
    return DDIMPolicy(
        components,
        num_steps=cfg.sampling.num_steps,
        guidance_scale=cfg.sampling.guidance_scale,
        eta=cfg.sampling.eta,
        device=device,
        sample_dtype=SAMPLE_DTYPES[cfg.model.sample_dtype],
    )
