"""Flow-matching model stacks (SD3 / SD3.5 and FLUX.1) as the policy drives them, and tiny random ones.

`FlowComponents` holds the parts of a diffusers `StableDiffusion3Pipeline` (kind "sd3": an
SD3Transformer2DModel, CLIP-L and CLIP-G text encoders with projection, an optional T5 encoder, a
16-channel AutoencoderKL with shift_factor, a FlowMatchEulerDiscreteScheduler) or `FluxPipeline`
(kind "flux": a FluxTransformer2DModel, a CLIP text encoder for the pooled embedding, a T5 encoder for
the sequence, the VAE, the scheduler), under the pipelines' own attribute names.

`tiny_sd3_components` and `tiny_flux_components` build the same classes with random weights, small
enough for a CPU test in well under a second: latents [4, 8, 8], images 16 x 16, a 2-layer
transformer, 1-2 layer text encoders over an in-memory CLIP BPE and T5 unigram tokenizer. The
scheduler and VAE factors are the real models' (SD3.5: shift 3.0, scaling 1.5305, shift factor 0.0609;
FLUX.1: resolution-dependent shift 0.5 .. 1.15, scaling 0.3611, shift factor 0.1159).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

FLOW_KINDS = ("sd3", "flux")
TINY_RESOLUTION = 16  # the tiny stacks' default image side: 8 x 8 latents through a 2-block VAE
PIPELINE_CLASSES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}

# LoRA targets on the transformer (peft matches module-name suffixes). SD3: Flow-GRPO's list for
# SD3.5-M (scripts/train_sd3.py: the joint attention's image and context projections). FLUX: Flow-GRPO's
# list for FLUX.1-dev (scripts/train_flux.py), which adds the feed-forward layers of both streams.
_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
LORA_TARGETS = {
    "sd3": _ATTENTION,
    "flux": _ATTENTION + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
}


@dataclass
class FlowComponents:
    """The parts of a flow-matching text-to-image pipeline, named as diffusers names them.

    sd3:  text_encoder / text_encoder_2 = CLIPTextModelWithProjection (CLIP-L, CLIP-G),
          text_encoder_3 = T5EncoderModel or None (SD3 runs without T5: zeros in its place).
    flux: text_encoder = CLIPTextModel (pooled), text_encoder_2 = T5EncoderModel (sequence).
    """

    kind: str  # "sd3" | "flux"
    transformer: torch.nn.Module  # the trainable part (LoRA adapters live inside)
    scheduler: Any  # FlowMatchEulerDiscreteScheduler
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    text_encoder_2: torch.nn.Module
    tokenizer_2: Any
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: Any = None

    def __post_init__(self):
        if self.kind not in FLOW_KINDS:
            raise ValueError(f"FlowComponents.kind={self.kind!r}: expected one of {FLOW_KINDS}")

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    def pipeline_modules(self) -> dict[str, Any]:
        """Keyword arguments of the diffusers pipeline class of this kind (StableDiffusion3Pipeline or
        FluxPipeline), without the optional image encoder."""
        names = [f.name for f in fields(self) if f.name != "kind"]
        if self.kind == "flux":
            names = [n for n in names if not n.endswith("_3")]
        return {n: getattr(self, n) for n in names}


def pipeline_class(kind: str):
    import diffusers

    return getattr(diffusers, PIPELINE_CLASSES[kind])


# ------------------------------------------------------------------------------------ tiny stacks
_TINY_WORDS = ["a", "an", "the", "and", "of", "on", "in", "with", "photo", "red", "green", "blue", "yellow",
               "white", "black", "circle", "square", "triangle", "cat", "dog", "left", "right"]


def tiny_t5_tokenizer():
    """A T5 tokenizer (unigram, metaspace pre-tokenizer, `</s>` appended, `<pad>` = 0) built in memory:
    whole-word pieces for a few words, single letters and digits for the rest, `<unk>` otherwise."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-"]
    pieces += [("\u2581" + w, -1.0) for w in _TINY_WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0)


def _tiny_clip(tokenizer, hidden: int, projection: int | None, layers: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=projection or hidden,
    )
    return (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)).eval()


def _tiny_t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )).eval()


def _tiny_vae(sample_size: int, scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=2 * sample_size, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def tiny_sd3_components(seed: int = 0, sample_size: int = 8, *, with_t5: bool = True) -> FlowComponents:
    """A random SD3-shaped stack: SD3Transformer2DModel (2 layers, 2 heads of 8, patch 2, 4 latent
    channels), CLIP-L and CLIP-G with projection (hidden 16, projection 16, so pooled 32), T5 with
    d_model 32 (= joint_attention_dim) unless `with_t5` is False, SD3.5's VAE factors and its scheduler
    (FlowMatchEulerDiscreteScheduler, shift 3.0). Weights are fixed by `seed`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from loop_ray.diffusion.tiny_tokenizer import tiny_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = tiny_clip_tokenizer(16), tiny_clip_tokenizer(16)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
            pooled_projection_dim=32, pos_embed_max_size=sample_size,
        )
        text_encoder = _tiny_clip(tokenizer, 16, 16)
        text_encoder_2 = _tiny_clip(tokenizer_2, 16, 16)
        tokenizer_3 = tiny_t5_tokenizer() if with_t5 else None
        text_encoder_3 = _tiny_t5(tokenizer_3, 32) if with_t5 else None
        vae = _tiny_vae(sample_size, 1.5305, 0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return FlowComponents("sd3", transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                          text_encoder_3, tokenizer_3)


def tiny_flux_components(seed: int = 0, sample_size: int = 8, *, guidance_embeds: bool = True) -> FlowComponents:
    """A random FLUX-shaped stack: FluxTransformer2DModel (1 double + 1 single block, 2 heads of 8,
    rotary axes (4, 2, 2), 16 packed input channels = 4 latent channels x 2 x 2, guidance embedding as
    in the guidance-distilled FLUX.1-dev), CLIPTextModel (hidden 16 = pooled_projection_dim), T5 with
    d_model 32 (= joint_attention_dim), FLUX.1's VAE factors and its scheduler config (dynamic shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from loop_ray.diffusion.tiny_tokenizer import tiny_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = tiny_clip_tokenizer(16), tiny_t5_tokenizer()
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
            guidance_embeds=guidance_embeds, axes_dims_rope=(4, 2, 2),
        )
        text_encoder = _tiny_clip(tokenizer, 16, None)
        text_encoder_2 = _tiny_t5(tokenizer_2, 32)
        vae = _tiny_vae(sample_size, 0.3611, 0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FlowComponents("flux", transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2)
