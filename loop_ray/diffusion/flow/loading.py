"""SD3 / FLUX.1 folders in diffusers layout: check, load for RL, save loadable by diffusers.

`check_flow_folder(folder, kind)` reads model_index.json and refuses, naming the folder and the
component, a folder this code cannot drive: another pipeline class, a missing component folder, a
scheduler other than FlowMatchEulerDiscreteScheduler (the SDE step follows its sigmas). It reads only
JSON, so the driver runs it before any actor starts (loop_ray/system/run/validate.py).

`load_flow_components(path_or_id, kind)` loads a local folder, or a Hugging Face id from the local
cache only (HF_HUB_OFFLINE; nothing is downloaded). The transformer is loaded in float32 (the
trainable copy); the frozen text encoders and the VAE in `frozen_dtype`.

`save_flow_pipeline(components, out)` writes a folder that plain `StableDiffusion3Pipeline` /
`FluxPipeline.from_pretrained(out)` loads, LoRA merged into the saved transformer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from loop_ray.diffusion.flow.models import PIPELINE_CLASSES, FlowComponents, pipeline_class

SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# component -> (library, class) to load it with; the T5 parts of SD3 may be absent
_PARTS = {
    "sd3": {
        "transformer": ("diffusers", "SD3Transformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection"), "tokenizer": ("transformers", "CLIPTokenizer"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "text_encoder_3": ("transformers", "T5EncoderModel"), "tokenizer_3": ("transformers", "T5TokenizerFast"),
        "scheduler": ("diffusers", SCHEDULER_CLASS),
    },
    "flux": {
        "transformer": ("diffusers", "FluxTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
        "text_encoder_2": ("transformers", "T5EncoderModel"), "tokenizer_2": ("transformers", "T5TokenizerFast"),
        "scheduler": ("diffusers", SCHEDULER_CLASS),
    },
}
OPTIONAL = {"sd3": ("text_encoder_3", "tokenizer_3"), "flux": ()}


class FlowModelError(ValueError):
    """A model folder the flow policy cannot drive; the message names the folder and the component."""


def _where_to_put(kind: str) -> str:
    return (f"put a diffusers {PIPELINE_CLASSES[kind]} folder (model_index.json and "
            f"{', '.join(p + '/' for p in _PARTS[kind] if p not in OPTIONAL[kind])}) there, or copy a Hugging Face "
            "cache that holds it (HF_HOME / HF_HUB_CACHE); nothing is downloaded on this machine")


def check_flow_folder(folder: str | os.PathLike, kind: str) -> dict:
    """Check that `folder` is a complete diffusers pipeline folder of `kind` ("sd3" or "flux");
    returns its model_index.json. Raises FlowModelError naming the folder and the component."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FlowModelError(f"{folder}: no model_index.json, so not a diffusers pipeline folder; {_where_to_put(kind)}")
    try:
        index = json.loads(index_path.read_text())
    except ValueError as err:
        raise FlowModelError(f"{index_path}: not valid JSON ({err})") from None
    expected = PIPELINE_CLASSES[kind]
    named = index.get("_class_name")
    if named != expected:
        hint = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "StableDiffusionPipeline": "stable_diffusion"}
        other = f" (use model.kind={hint[named]})" if named in hint else ""
        raise FlowModelError(
            f"{index_path} names the pipeline {named!r}; model.kind={kind} drives {expected}{other}"
        )
    for part in _PARTS[kind]:
        entry = index.get(part)
        listed = isinstance(entry, list) and entry and entry[-1] is not None
        if part in OPTIONAL[kind] and not listed:
            continue
        if not listed:
            raise FlowModelError(f"{index_path}: component {part!r} is not listed (a {expected} needs it)")
        if not (folder / part).is_dir():
            raise FlowModelError(f"{folder}: component folder {part}/ is missing (model_index.json lists it)")
    optional = [p for p in OPTIONAL[kind] if (folder / p).is_dir()]
    if len(optional) not in (0, len(OPTIONAL[kind])):
        raise FlowModelError(f"{folder}: {optional[0]}/ without its pair ({', '.join(OPTIONAL[kind])} go together)")
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_config.is_file():
        raise FlowModelError(f"{folder}: component scheduler/ has no scheduler_config.json")
    scheduler_class = json.loads(scheduler_config.read_text()).get("_class_name")
    if scheduler_class != SCHEDULER_CLASS:
        raise FlowModelError(
            f"{scheduler_config}: component scheduler is {scheduler_class!r}, not a flow-matching "
            f"{SCHEDULER_CLASS}; the flow policy's SDE step follows that scheduler's sigmas"
        )
    return index


def resolve_flow_folder(path_or_id: str, kind: str, revision: str | None = None) -> Path:
    """The checked local folder of `path_or_id`: the path itself if it is a folder, else the snapshot
    of the Hugging Face id in the local cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise FlowModelError(f"model.revision={revision!r} only applies to a Hugging Face id, not the folder {path}")
        folder = path
    elif str(path_or_id).startswith(("/", ".", "~")) or str(path_or_id).count("/") != 1:
        raise FileNotFoundError(f"{PIPELINE_CLASSES[kind]} weights not found: no folder {path}; {_where_to_put(kind)}")
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(path_or_id, revision=revision, local_files_only=True))
        except Exception as err:  # noqa: BLE001 - every cache miss is reported the same way
            raise FileNotFoundError(
                f"{path_or_id!r} is neither a local folder nor in the local Hugging Face cache; "
                f"{_where_to_put(kind)} ({type(err).__name__})"
            ) from None
    check_flow_folder(folder, kind)
    return folder


def load_flow_components(
    path_or_id: str, kind: str, revision: str | None = None, frozen_dtype: torch.dtype = torch.float32
) -> FlowComponents:
    """The parts of an SD3 / FLUX.1 folder: transformer in float32, frozen parts (eval mode, no grad) in
    `frozen_dtype`, tokenizers, and the scheduler from its own config (its shift settings)."""
    import diffusers
    import transformers

    folder = str(resolve_flow_folder(path_or_id, kind, revision))
    libraries = {"diffusers": diffusers, "transformers": transformers}
    parts = {}
    for part, (library, class_name) in _PARTS[kind].items():
        if part in OPTIONAL[kind] and not (Path(folder) / part).is_dir():
            parts[part] = None
            continue
        cls = getattr(libraries[library], class_name)
        if part == "scheduler":
            parts[part] = cls.from_config(cls.load_config(folder, subfolder=part))
        elif part.startswith("tokenizer"):
            parts[part] = cls.from_pretrained(folder, subfolder=part, local_files_only=True)
        else:
            dtype = torch.float32 if part == "transformer" else frozen_dtype
            key = "torch_dtype" if library == "diffusers" else "dtype"
            module = cls.from_pretrained(folder, subfolder=part, local_files_only=True, **{key: dtype})
            parts[part] = module if part == "transformer" else module.requires_grad_(False).eval()
    return FlowComponents(kind=kind, **parts)


def save_flow_pipeline(components: FlowComponents, out_dir: str | os.PathLike) -> Path:
    """Write `components` as a diffusers pipeline folder of their kind (LoRA merged into the saved
    transformer; the live one keeps its adapters); returns the folder."""
    from loop_ray.diffusion.ddim.stable_diffusion import plain_unet

    modules = components.pipeline_modules()
    modules["transformer"] = plain_unet(components.transformer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_class(components.kind)(**modules).save_pretrained(out)
    return out
