"""The model kinds and sampling dtypes a config may name (constants only: every module may import it)."""

from __future__ import annotations

import torch

SAMPLE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DDIM_MODEL_KINDS = ("toy", "stable_diffusion", "tiny_sd")  # built by loop_ray.diffusion.ddim
FLOW_MODEL_KINDS = ("sd3", "flux", "tiny_sd3", "tiny_flux")  # built by loop_ray.diffusion.flow.policy
