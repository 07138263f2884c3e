"""The choices a config's model and sampling sections may name: model kinds, sampling dtypes, which
parameters train, the stochastic window's placement, group noise and the flow SDE step (constants
only: every module may import it, and loop_ray.config builds its choices from these)."""

from __future__ import annotations

import torch

SAMPLE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DDIM_MODEL_KINDS = ("toy", "stable_diffusion", "tiny_sd")  # built by loop_ray.diffusion.ddim
FLOW_MODEL_KINDS = ("sd3", "flux", "tiny_sd3", "tiny_flux")  # built by loop_ray.diffusion.flow.policy
MODEL_KINDS = DDIM_MODEL_KINDS + FLOW_MODEL_KINDS
TRAINABLE = ("all", "cross_attention", "condition_gain")  # loop_ray.diffusion.trainable.select_trainable
WINDOW_PLACEMENTS = ("fixed", "random", "sliding")  # loop_ray.diffusion.windows.stochastic_steps
GROUP_NOISE = ("independent", "branch", "shared", "antithetic")  # loop_ray.diffusion.policy_base.PolicyBase.sample
SDE_KINDS = ("sde", "cps")  # loop_ray.diffusion.flow.logprob: Flow-GRPO's SDE step, Flow-CPS's
