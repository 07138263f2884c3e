"""The frozen parts of a policy's pipeline, written beside a checkpoint's trained network.

`write_frozen_parts(policy, kind, folder)` writes model_index.json and every part of the pipeline
but the trained one (unet/, or transformer/ for a flow model) into `folder`, each with its own
save_pretrained, so that a folder holding those and the trained network is a whole pipeline:
  toy                    loop_ray.toy.model.load_toy_components(folder) (text_encoder, tokenizer, scheduler)
  tiny_sd, stable_diffusion  diffusers.StableDiffusionPipeline.from_pretrained(folder) (vae, text_encoder,
                         tokenizer, scheduler: the DDIM scheduler the policy samples with; no safety checker)
  sd3, flux, tiny_*      StableDiffusion3Pipeline / FluxPipeline.from_pretrained(folder)
A checkpoint links these from one copy per run (loop_ray.training.checkpoint.link_frozen_parts).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from loop_ray.diffusion.kinds import FLOW_MODEL_KINDS

# a checkpoint of a random tiny stack is a folder of the real kind
FOLDER_KIND = {"tiny_sd": "stable_diffusion", "tiny_sd3": "sd3", "tiny_flux": "flux"}


def _bare(module):
    module = getattr(module, "module", module)  # a DeepSpeed engine / DDP wrapper
    return getattr(module, "_orig_mod", module)  # torch.compile


def write_frozen_parts(policy, kind: str, folder: str | Path) -> Path:
    """Write `policy`'s frozen pipeline parts and model_index.json (model.kind `kind`) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "toy":
        from loop_ray.toy.model import save_toy_frozen_parts

        parts = SimpleNamespace(text_encoder=policy.text_encoder, tokenizer=policy.tokenizer, scheduler=policy.scheduler)
        return save_toy_frozen_parts(parts, folder)
    if kind in FLOW_MODEL_KINDS:
        from loop_ray.diffusion.flow.models import pipeline_class

        modules = policy.components.pipeline_modules()
        modules["transformer"] = _bare(policy.unet)
        pipe = pipeline_class(policy.components.kind)(**modules)
        trained = "transformer"
    elif kind in ("stable_diffusion", "tiny_sd"):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=policy.vae, text_encoder=policy.text_encoder, tokenizer=policy.tokenizer, unet=_bare(policy.unet),
            scheduler=DDIMScheduler.from_config(policy.scheduler.config),  # a copy: the pipeline may edit its config
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        trained = "unet"
    else:
        raise ValueError(f"model.kind={kind!r}: no pipeline to write")
    pipe.save_config(folder)  # model_index.json
    for name, entry in pipe.config.items():
        if name == trained or not isinstance(entry, (list, tuple)):  # a module's entry: [library, class]
            continue
        part = getattr(pipe, name, None)
        if part is not None and hasattr(part, "save_pretrained"):
            part.save_pretrained(folder / name)
    return folder
