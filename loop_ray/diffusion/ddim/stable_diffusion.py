"""Stable Diffusion 1.x / 2.x stacks in diffusers format: load for RL, save loadable by diffusers.

`load_components(path_or_id)` reads a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/,
tokenizer/, scheduler/ and model_index.json) from a local path, or a Hugging Face id resolved from
the local cache only (nothing is downloaded). The scheduler is a DDIMScheduler built from the
model's own scheduler config (its beta schedule, prediction type, timestep offset), since LOOP and
DDPO sample and score DDIM transitions with eta > 0.

`save_pretrained(components, out_dir)` writes a folder that plain
`diffusers.StableDiffusionPipeline.from_pretrained(out_dir)` loads with no loop-ray code: LoRA
adapters, if any, are merged into the saved UNet's weights (the live UNet keeps its adapters), and
the pipeline is saved without a safety checker.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from loop_ray.diffusion.ddim.components import SDComponents

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _where_to_put(path_or_id: str) -> str:
    return (
        f"put a diffusers Stable Diffusion folder ({', '.join(s + '/' for s in SUBFOLDERS)} and "
        "model_index.json) at that path, or, on a machine with network access, run "
        f"`huggingface-cli download {path_or_id if path_or_id.count('/') == 1 else 'ORG/MODEL'}` and copy the "
        "Hugging Face cache (HF_HOME / HF_HUB_CACHE) here; nothing is downloaded on this machine"
    )


def resolve_model_folder(path_or_id: str, revision: str | None = None) -> Path:
    """A local diffusers folder for `path_or_id`: the path itself if it is a folder, else the
    snapshot of the Hugging Face id `path_or_id` (at `revision`) in the local cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"model.revision={revision!r} only applies to a Hugging Face id, not the folder {path}")
        folder = path
    elif str(path_or_id).startswith(("/", ".", "~")) or str(path_or_id).count("/") != 1:
        raise FileNotFoundError(f"Stable Diffusion weights not found: no folder {path}; {_where_to_put(path_or_id)}")
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(path_or_id, revision=revision, local_files_only=True))
        except Exception as err:  # noqa: BLE001 - every cache miss is reported the same way
            raise FileNotFoundError(
                f"Stable Diffusion weights for {path_or_id!r}"
                + (f" (revision {revision!r})" if revision else "")
                + f" are neither a local folder nor in the local Hugging Face cache; {_where_to_put(path_or_id)} "
                f"({type(err).__name__})"
            ) from None
    missing = [s for s in SUBFOLDERS if not (folder / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete Stable Diffusion folder: missing {', '.join(m + '/' for m in missing)}; "
            f"{_where_to_put(path_or_id)}"
        )
    return folder


def load_components(path_or_id: str, revision: str | None = None, dtype: str | torch.dtype = torch.float32) -> SDComponents:
    """UNet, VAE, CLIP text encoder and tokenizer of a Stable Diffusion model, with a DDIMScheduler
    made from its scheduler config; weights in `dtype` (float32 by default: the trainable copy)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    folder = str(resolve_model_folder(path_or_id, revision))
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype, local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(folder, subfolder="scheduler"))
    text_encoder.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    return SDComponents(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)


def plain_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet (or any diffusers model: an SD3 / FLUX transformer) to save: the module itself without
    adapters or gains, or a plain copy of its class with the LoRA updates or the condition gains
    merged into its weights (built on the CPU; the live module is left untouched)."""
    from loop_ray.diffusion import condition_gain, lora

    unet = getattr(unet, "module", unet)  # a DeepSpeed engine / DDP wrapper
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile
    if lora.has_lora(unet):
        state = lora.merged_state_dict(unet)
    elif condition_gain.has_condition_gain(unet):
        state = condition_gain.merged_state_dict(unet)
    else:
        return unet
    plain = type(unet).from_config(unet.config)
    plain.load_state_dict(state, strict=True, assign=True)  # keeps the weights' dtype
    return plain


def save_pretrained(components: SDComponents, out_dir: str | os.PathLike, *, safe_serialization: bool = True) -> Path:
    """Write `components` as a diffusers StableDiffusionPipeline folder (LoRA merged into the UNet,
    no safety checker); returns the folder."""
    from diffusers import StableDiffusionPipeline

    if components.vae is None:
        raise ValueError("save_pretrained writes Stable Diffusion (latent) stacks; these components have no VAE")
    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=plain_unet(components.unet),
        scheduler=components.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=safe_serialization)
    return out
