"""Text conditioning of SD3 and FLUX.1, computed as their diffusers pipelines compute it.

SD3 (StableDiffusion3Pipeline.encode_prompt, clip_skip None): each CLIP (L and G) gives its
penultimate hidden states over the first tokenizer's `model_max_length` tokens and its projected
pooled embedding; the sequence is [CLIP-L | CLIP-G] along features, zero-padded to T5's width, then
T5's `max_sequence_length` states appended along tokens (zeros of the transformer's
joint_attention_dim when the T5 encoder is absent); pooled = [pooled CLIP-L | pooled CLIP-G].

FLUX.1 (FluxPipeline.encode_prompt): pooled = the CLIP text model's pooler output; the sequence = T5's
last hidden states over `max_sequence_length` tokens. Its text position ids are zeros [L, 3] and its
image position ids follow from the latent size alone, so neither is stored (`flux_position_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loop_ray.diffusion.flow.models import FlowComponents

DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' defaults


def _ids(tokenizer, prompts: Sequence[str], length: int, device) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def encode_sd3(components: FlowComponents, prompts: Sequence[str], max_sequence_length: int | None = None):
    """(prompt_embeds [N, L_clip + L_t5, D], pooled_embeds [N, P]) of SD3, float32 on the CPU."""
    length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH["sd3"]
    clip_length = components.tokenizer.model_max_length
    states, pooled = [], []
    for tokenizer, encoder in ((components.tokenizer, components.text_encoder),
                               (components.tokenizer_2, components.text_encoder_2)):
        out = encoder(_ids(tokenizer, prompts, clip_length, _device(encoder)), output_hidden_states=True)
        states.append(out.hidden_states[-2].float())
        pooled.append(out[0].float())
    clip = torch.cat(states, dim=-1)
    if components.text_encoder_3 is None:
        width = components.transformer.config.joint_attention_dim
        t5 = torch.zeros(len(prompts), length, width, device=clip.device)
    else:
        encoder = components.text_encoder_3
        t5 = encoder(_ids(components.tokenizer_3, prompts, length, _device(encoder)))[0].float().to(clip.device)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2).cpu(), torch.cat(pooled, dim=-1).cpu()


@torch.no_grad()
def encode_flux(components: FlowComponents, prompts: Sequence[str], max_sequence_length: int | None = None):
    """(prompt_embeds [N, L_t5, D], pooled_embeds [N, P]) of FLUX.1, float32 on the CPU."""
    length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH["flux"]
    clip, t5 = components.text_encoder, components.text_encoder_2
    pooled = clip(_ids(components.tokenizer, prompts, components.tokenizer.model_max_length, _device(clip)),
                  output_hidden_states=False).pooler_output
    states = t5(_ids(components.tokenizer_2, prompts, length, _device(t5)), output_hidden_states=False)[0]
    return states.float().cpu(), pooled.float().cpu()


def encode_prompts(components: FlowComponents, prompts: Sequence[str], max_sequence_length: int | None = None):
    """(prompt_embeds, pooled_embeds) of the components' kind."""
    encode = encode_sd3 if components.kind == "sd3" else encode_flux
    return encode(components, prompts, max_sequence_length)


def flux_position_ids(text_length: int, latent_height: int, latent_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's rotary position ids: text (zeros [L, 3]) and image ([h/2 * w/2, 3]: 0, row, column of each
    2 x 2 latent patch, in the packing order of `pack_latents`)."""
    rows, cols = latent_height // 2, latent_width // 2
    image = torch.zeros(rows, cols, 3)
    image[..., 1] = torch.arange(rows)[:, None]
    image[..., 2] = torch.arange(cols)[None, :]
    return torch.zeros(text_length, 3), image.reshape(rows * cols, 3)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> FLUX's token sequence [B, H/2 * W/2, 4C] of 2 x 2 patches (row-major patches;
    within a token, channel-major then the patch's row and column)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for a latent of height x width."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)
