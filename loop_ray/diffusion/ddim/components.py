"""The Stable-Diffusion-shaped component stack a DDIM policy wraps (SD 1.x/2.x, the tiny test stack, the embedded model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SDComponents:
    unet: torch.nn.Module  # diffusers UNet2DConditionModel (the trainable part; LoRA adapters live inside)
    text_encoder: torch.nn.Module  # transformers CLIPTextModel (frozen)
    tokenizer: Any  # a transformers tokenizer: __call__(list[str], padding="max_length", ...) -> input_ids
    scheduler: Any  # diffusers DDIMScheduler, configured from the model's own scheduler config
    vae: torch.nn.Module | None = None  # diffusers AutoencoderKL; None for a pixel-space model (the toy)
