"""The embedded world's text-to-image model: build, save and load it in the diffusers folder layout.

A pixel-space diffusers UNet2DConditionModel (3 channels in and out, 24x24 by default, output in [-1, 1])
cross-attends to a small transformers CLIPTextModel over the word-level toy tokenizer. The folder
holds unet/, text_encoder/, tokenizer/, scheduler/ (DDIMScheduler) and model_index.json, each part
written with save_pretrained and read with from_pretrained, as for Stable Diffusion (no vae/).

Scheduler: 1000 training steps with cosine ("squaredcos_cap_v2") betas, "leading" timestep spacing
with steps_offset=1, so that the first sampled timestep is 901 with 10 sampling steps (alpha-bar
about 2e-2) or 951 with 20 (about 6e-3) rather than t=999 (alpha-bar ~2e-9, whose step makes the RL
gradient meaningless); set_alpha_to_one=False.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from loop_ray.diffusion.ddim.components import SDComponents
from loop_ray.toy.tokenizer import MAX_LENGTH, build_tokenizer, load_tokenizer, save_tokenizer

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class ToyModelSpec:
    """Sizes of the toy model; the defaults are the committed model's (24x24 pixels, about 0.45 M UNet
    parameters: small enough that a CPU run spends thousands of images, docs/embedded-world.md)."""

    image_size: int = 24
    channels: tuple[int, ...] = (16, 32, 32)
    norm_groups: int = 8
    attention_head_dim: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 128
    down_blocks: tuple[str, ...] = field(default=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"))
    up_blocks: tuple[str, ...] = field(default=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


TINY_SPEC = ToyModelSpec(
    image_size=16,
    channels=(8, 16),
    norm_groups=4,
    attention_head_dim=4,
    text_hidden=16,
    text_layers=1,
    text_heads=2,
    text_intermediate=32,
    down_blocks=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_blocks=("CrossAttnUpBlock2D", "UpBlock2D"),
)


def default_model_path() -> Path:
    """The committed embedded checkpoint, loop_ray/assets/toy_model/."""
    return Path(str(resources.files("loop_ray") / "assets" / "toy_model"))


def build_toy_components(spec: ToyModelSpec = ToyModelSpec(), seed: int = 0) -> SDComponents:
    """A randomly initialised toy model (weights drawn from torch seed `seed`)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        projection_dim=spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=spec.image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=spec.channels,
        layers_per_block=1,
        norm_num_groups=spec.norm_groups,
        down_block_types=spec.down_blocks,
        up_block_types=spec.up_blocks,
        cross_attention_dim=spec.text_hidden,
        attention_head_dim=spec.attention_head_dim,
        only_cross_attention=True,
    )
    return SDComponents(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=DDIMScheduler(**SCHEDULER_CONFIG))


def training_scheduler(scheduler) -> DDPMScheduler:
    """The DDPM scheduler with the same noise schedule as `scheduler` (for add_noise in training)."""
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
    return DDPMScheduler(**{k: scheduler.config[k] for k in keys})


def save_toy_model(components: SDComponents, folder: str | Path) -> Path:
    """Write the model into `folder` in the diffusers layout (safetensors weights) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    components.unet.save_pretrained(folder / "unet")
    save_toy_frozen_parts(components, folder)
    return folder


def save_toy_frozen_parts(components: SDComponents, folder: str | Path) -> Path:
    """Write everything of the model but unet/: text_encoder/, tokenizer/, scheduler/ and
    model_index.json (a checkpoint adds its trained unet/ beside them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    components.text_encoder.save_pretrained(folder / "text_encoder")
    save_tokenizer(components.tokenizer, folder / "tokenizer")
    components.scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "LoopRayToyPipeline",
        "_diffusers_version": _diffusers_version(),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def load_toy_components(path: str | Path | None = None) -> SDComponents:
    """Load a toy model folder (None: the committed default) as SDComponents with vae=None, in eval mode."""
    folder = Path(path) if path is not None else default_model_path()
    if not folder.is_dir():
        raise FileNotFoundError(f"toy model folder not found: {folder}")
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing or not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a toy model folder: missing {missing or ['model_index.json']} "
            "(expected unet/, text_encoder/, tokenizer/, scheduler/, model_index.json)"
        )
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    return SDComponents(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(folder / "tokenizer"),
        scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
        vae=None,
    )


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())
