"""CLIP image-text alignment reward, and the open_clip loader shared with the aesthetic reward.

    r(x, c) = 100 * cos(f_img(x), f_txt(c))

with f_img / f_txt the open_clip image and text embeddings (the "CLIP score" of Hessel et al.,
2021, without their 2.5 rescaling and clipping at 0). The model is loaded once at build time:

  model_name="ViT-L-14", pretrained="openai"        a built-in architecture and a pretrained tag,
                                                    resolved from the local Hugging Face cache
                                                    only (no download) unless local_files_only=False
  model_name="ViT-L-14", pretrained="/x/model.bin"  a built-in architecture and a weights file (for
                                                    OpenAI's ViT-L/14 weights also quick_gelu=True, which a
                                                    tag such as "openai" sets by itself)
  model_name="local-dir:/x/folder"                  a folder holding open_clip_config.json and
                                                    open_clip_pytorch_model.bin (or .safetensors)
  model_name="hf-hub:org/repo"                      open_clip's own Hub loader (may download)

Images are preprocessed with the model's own open_clip eval transform (resize, centre crop,
normalise) and embedded in chunks of `batch_size`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loop_ray.rewards import as_uint8_images, register

_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")


def _default_device(device: str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.startswith((".", "~")) or Path(text).suffix in (
        ".bin", ".pt", ".pth", ".safetensors")


def _resolve_tag(model_name: str, tag: str, cache_dir: str | None) -> tuple[str, dict]:
    """Local path of the weights of an open_clip pretrained tag, from the cache only."""
    import open_clip
    from huggingface_hub import hf_hub_download

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    hub = cfg.get("hf_hub", "")
    missing = (
        f"open_clip weights for model_name={model_name!r} pretrained={tag!r} are not in the local cache "
        f"(cache_dir={cache_dir or 'the default Hugging Face cache, HF_HOME/HF_HUB_CACHE'}) and nothing is "
        "downloaded here. On a machine with network access run "
        f"`open_clip.create_model({model_name!r}, pretrained={tag!r}, cache_dir=DIR)` and copy DIR to this "
        "machine (pass it as cache_dir), or pass pretrained=/path/to/open_clip_pytorch_model.bin"
    )
    if hub:
        # open_clip's convention: "org/repo/" means the repo's default file, "org/repo/file.bin" that file
        repo_id, filename = (hub[:-1], "") if hub.endswith("/") else os.path.split(hub)
        errors = []
        for name in [filename] if filename else list(_WEIGHT_FILES):
            try:
                return hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=True), cfg
            except Exception as err:  # noqa: BLE001 - any miss in the cache means "not here"
                errors.append(f"{repo_id}/{name}: {type(err).__name__}")
        raise FileNotFoundError(f"{missing} (looked for {', '.join(errors)})")
    url = cfg.get("url", "")
    if url:
        for folder in (cache_dir, os.path.expanduser("~/.cache/clip")):
            if folder and os.path.isfile(os.path.join(folder, os.path.basename(url))):
                return os.path.join(folder, os.path.basename(url)), cfg
    raise FileNotFoundError(missing)


def default_pretrained(model_name: str, pretrained: str | None) -> str | None:
    """The builders' default weights: OpenAI's for a built-in open_clip model name, none for a
    `local-dir:` or `hf-hub:` model, which carries its own."""
    if pretrained is None and not model_name.startswith(("local-dir:", "hf-hub:")):
        return "openai"
    return pretrained


class OpenClipEncoder:
    """An open_clip model loaded once (see the module docstring for the ways to name it), with
    L2-normalised image and text embeddings."""

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str | None = None,
        cache_dir: str | None = None,
        device: str | None = None,
        precision: str = "fp32",
        local_files_only: bool = True,
        batch_size: int = 32,
        quick_gelu: bool | None = None,
    ):
        import open_clip

        self.device = _default_device(device)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        kwargs: dict = {"device": self.device, "precision": precision, "cache_dir": cache_dir}
        if model_name.startswith("local-dir:"):
            folder = Path(model_name.split(":", 1)[1]).expanduser()
            if pretrained is not None:
                raise ValueError(
                    f"pretrained={pretrained!r} cannot be combined with model_name={model_name!r}: "
                    "the folder itself holds the weights")
            if not (folder / "open_clip_config.json").is_file() or not any(
                    p.suffix in (".safetensors", ".bin", ".pth") for p in folder.glob("*")):
                raise FileNotFoundError(
                    f"open_clip model folder {folder} is missing or incomplete: put open_clip_config.json and "
                    "open_clip_pytorch_model.bin (or open_clip_model.safetensors) there, e.g. the files of "
                    "the Hugging Face repo of the model")
            name = f"local-dir:{folder}"
        elif model_name.startswith("hf-hub:"):
            name = model_name
        else:
            name = model_name
            if name not in open_clip.list_models():
                raise ValueError(f"model_name={model_name!r} is not an open_clip architecture; known: "
                                 f"{open_clip.list_models()}")
            if pretrained is None:
                raise ValueError(
                    f"pretrained is required with model_name={model_name!r}: a tag such as 'openai' or the "
                    "path of a weights file (a randomly initialised reward model is never built)")
            if os.path.isfile(os.path.expanduser(pretrained)):
                kwargs["pretrained"] = os.path.expanduser(pretrained)
            elif open_clip.get_pretrained_cfg(name, pretrained):
                tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
                # the tag's activation: OpenAI's weights were trained with QuickGELU, which open_clip's
                # plain "ViT-L-14" architecture does not use (it only warns about the mismatch)
                kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
                if local_files_only:
                    path, _ = _resolve_tag(name, pretrained, cache_dir)
                    kwargs["pretrained"] = path
                    # loading the tag's file by path loses the tag's preprocessing: pass it on
                    for key, arg in (("mean", "image_mean"), ("std", "image_std"),
                                     ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
                        if key in tag_cfg:
                            kwargs[arg] = tag_cfg[key]
                else:
                    kwargs["pretrained"] = pretrained
            elif _looks_like_path(pretrained):
                raise FileNotFoundError(
                    f"open_clip weights file {pretrained} not found: put the {model_name} checkpoint "
                    "(open_clip_pytorch_model.bin) there, or give a pretrained tag")
            else:
                raise ValueError(
                    f"pretrained={pretrained!r} is neither a file nor a tag of {model_name!r}; tags: "
                    f"{open_clip.list_pretrained_tags_by_model(name)}")
        if quick_gelu is not None:
            kwargs["force_quick_gelu"] = bool(quick_gelu)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
        except FileNotFoundError:
            raise
        except RuntimeError as err:
            raise RuntimeError(f"could not load open_clip model_name={model_name!r} pretrained={pretrained!r}: "
                               f"{err}") from err
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
        self.embed_dim = int(self._probe_dim())

    def _probe_dim(self) -> int:
        if isinstance(getattr(self.model.visual, "output_dim", None), int):
            return self.model.visual.output_dim
        size = self.model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        with torch.inference_mode():
            return self.model.encode_image(torch.zeros(1, 3, *size, device=self.device, dtype=self._dtype())).shape[-1]

    def _dtype(self) -> torch.dtype:
        """The dtype the image tower takes (its patch embedding's; open_clip may keep norms in float32)."""
        conv = getattr(self.model.visual, "conv1", None)
        return conv.weight.dtype if conv is not None else next(self.model.visual.parameters()).dtype

    @torch.inference_mode()
    def image_features(self, images) -> torch.Tensor:
        """float32 [B, D]: L2-normalised image embeddings of uint8 [B, H, W, 3] images."""
        images = as_uint8_images(images)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            pixels = torch.stack([self.preprocess(Image.fromarray(im)) for im in chunk])
            feats = self.model.encode_image(pixels.to(self.device, self._dtype())).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=self.device)

    @torch.inference_mode()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """float32 [B, D]: L2-normalised text embeddings."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(list(prompts[start:start + self.batch_size])).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=self.device)


class ClipScore:
    """r(x, c) = 100 * cos(f_img(x), f_txt(c)); float32 in [-100, 100]."""

    def __init__(self, encoder: OpenClipEncoder):
        self.encoder = encoder

    def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
        images = as_uint8_images(images)
        if len(prompts) != len(images):
            raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
        img = self.encoder.image_features(images)
        txt = self.encoder.text_features(list(prompts))
        return (100.0 * (img * txt).sum(-1)).cpu().numpy().astype(np.float32)


@register("clip_score")
def build_clip_score(
    model_name: str = "ViT-L-14",
    pretrained: str | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
    precision: str = "fp32",
    local_files_only: bool = True,
    batch_size: int = 32,
    quick_gelu: bool | None = None,
) -> ClipScore:
    """CLIP score with open_clip `model_name`; `pretrained` defaults to 'openai' for built-in names."""
    pretrained = default_pretrained(model_name, pretrained)
    return ClipScore(OpenClipEncoder(model_name, pretrained, cache_dir, device, precision, local_files_only,
                                     batch_size, quick_gelu))
