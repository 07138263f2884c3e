"""Build the denoiser stack of an experiment and wrap it in a DiffusionPolicy.

`tiny_sd_components` is a randomly initialised Stable-Diffusion-shaped stack of the real classes
(UNet2DConditionModel with cross-attention, AutoencoderKL with 4 latent channels, CLIPTextModel,
CLIPTokenizer, DDIMScheduler with SD's schedule), small enough to build in well under a second on a
CPU, for tests and benchmarks. The other kinds load from elsewhere in the package, lazily.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from loop_ray.diffusion.components import Components
from loop_ray.diffusion.policy import DiffusionPolicy
from loop_ray.diffusion.policy_base import PolicyBase

SAMPLE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOW_MODEL_KINDS = ("sd3", "flux", "tiny_sd3", "tiny_flux")  # built by loop_ray.diffusion.flow_policy

# Whole-word tokens of the tiny tokenizer; any other text still tokenizes, byte by byte.
_TINY_WORDS = [
    "a",
    "an",
    "the",
    "and",
    "of",
    "on",
    "in",
    "with",
    "to",
    "left",
    "right",
    "top",
    "bottom",
    "above",
    "below",
    "next",
    "photo",
    "red",
    "green",
    "blue",
    "yellow",
    "cyan",
    "magenta",
    "white",
    "black",
    "circle",
    "square",
    "triangle",
    "cat",
    "dog",
]


def tiny_clip_tokenizer(model_max_length: int = 32) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer built in memory, with no download.

    Vocabulary: the two CLIP specials, the 256 byte-level symbols with and without the end-of-word
    mark `</w>`, and whole-word tokens for `_TINY_WORDS` with the merges that build them. Padding
    and the unknown token are `<|endoftext|>`, as in CLIP. `save_pretrained` writes tokenizer.json.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for symbol in alphabet + [c + "</w>" for c in alphabet]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
            vocab.setdefault(left, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_sd_components(
    seed: int = 0,
    sample_size: int = 8,
    *,
    cross_attention_dim: int = 32,
    prediction_type: str = "epsilon",
    max_length: int = 32,
) -> Components:
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
    return Components(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)


def build_policy(cfg, device: str | torch.device = "cpu") -> PolicyBase:
    """The policy of an ExperimentConfig: model stack by `cfg.model.kind` (a flow kind gives a
    FlowPolicy, the others a DiffusionPolicy), LoRA adapters if `cfg.model.lora_rank > 0`, sampling
    settings from `cfg.sampling`."""
    kind = cfg.model.kind
    if kind in FLOW_MODEL_KINDS:
        from loop_ray.diffusion.flow_policy import build_flow_policy

        return build_flow_policy(cfg, device)
    if kind == "tiny_sd":
        components = tiny_sd_components(cfg.model.seed)
    elif kind == "toy":
        from loop_ray.toy.model import load_toy_components

        components = load_toy_components(cfg.model.path)
    elif kind == "stable_diffusion":
        from loop_ray.diffusion.stable_diffusion import load_components

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
    return DiffusionPolicy(
        components,
        num_steps=cfg.sampling.num_steps,
        guidance_scale=cfg.sampling.guidance_scale,
        eta=cfg.sampling.eta,
        device=device,
        sample_dtype=SAMPLE_DTYPES[cfg.model.sample_dtype],
    )
