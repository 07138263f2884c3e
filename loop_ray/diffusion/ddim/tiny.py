"""`tiny_sd_components`: a randomly initialised Stable-Diffusion-shaped stack of the real classes
(UNet2DConditionModel with cross-attention, AutoencoderKL with 4 latent channels, CLIPTextModel,
CLIPTokenizer, DDIMScheduler with SD's schedule), small enough to build in well under a second on a
CPU, for tests and benchmarks."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from loop_ray.diffusion.ddim.components import SDComponents
from loop_ray.diffusion.tiny_tokenizer import tiny_clip_tokenizer


def tiny_sd_components(
    seed: int = 0,
    sample_size: int = 8,
    *,
    cross_attention_dim: int = 32,
    prediction_type: str = "epsilon",
    max_length: int = 32,
) -> SDComponents:
    """A tiny random SD-shaped stack: latents [4, sample_size, sample_size], images 2x that size.

    UNet: channels (16, 32), one cross-attention down/up block; VAE: two blocks (downscale 2),
    SD's scaling_factor 0.18215; text encoder: 2 layers, hidden `cross_attention_dim`; scheduler:
    SD's DDIM config (scaled_linear betas 0.00085..0.012, steps_offset 1, set_alpha_to_one False,
    clip_sample False). Weights are fixed by `seed`.
    """
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer(max_length)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=2 * sample_size,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cross_attention_dim,
                intermediate_size=2 * cross_attention_dim,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type=prediction_type,
    )
    return SDComponents(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)
