"""LAION aesthetic reward, as used for DDPO's aesthetic-quality task (Black et al., 2023, section 5.1).

    e(x) = f_img(x) / ||f_img(x)||_2                  the CLIP ViT-L/14 image embedding (768-d), L2-normalised
    r(x) = W_7(W_6(W_4(W_2(W_0 e + b_0) + b_2) + b_4) + b_6) + b_7

The head is LAION's "improved aesthetic predictor" MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1, stored
as an nn.Sequential of Linear and Dropout layers (keys `layers.{0,2,4,6,7}.{weight,bias}`); it has
no non-linearities and its dropouts are inactive at eval time, so the score is an affine function of
the normalised embedding. Scores of real photographs fall roughly in 1..10.

The head weights ship with loop-ray (`loop_ray/assets/aesthetic/sac+logos+ava1-l14-linearMSE.pth`,
MIT, via DDPO); the ViT-L/14 backbone is loaded with open_clip as in `clip_score` (model_name /
pretrained / cache_dir kwargs, local files only by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loop_ray.rewards import as_uint8_images, register
from loop_ray.rewards.clip_score import OpenClipEncoder, default_pretrained

HEAD_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


def default_head_path() -> Path:
    return Path(str(resources.files("loop_ray") / "assets" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"))


class AestheticHead(nn.Module):
    """LAION's aesthetic MLP: Linear/Dropout layers, no activations; [N, in_dim] -> [N]."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    @property
    def in_dim(self) -> int:
        return self.layers[0].in_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_head(path: str | Path | None = None) -> AestheticHead:
    """The aesthetic head from a state-dict file (default: the packaged LAION weights), in eval mode."""
    path = Path(path).expanduser() if path is not None else default_head_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"aesthetic head weights not found at {path}: put sac+logos+ava1-l14-linearMSE.pth (LAION's "
            "improved-aesthetic-predictor head) there, or leave head_path unset to use the packaged copy")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # the upstream file was saved on CUDA
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is not a head
        raise ValueError(f"aesthetic head file {path} is not a torch state dict: {err}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or sorted(state) != sorted(HEAD_KEYS):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"aesthetic head file {path}: expected keys {list(HEAD_KEYS)}, got {keys}")
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval().requires_grad_(False)


class AestheticScore:
    """r(x) = head(normalised CLIP image embedding of x); the prompt is ignored."""

    def __init__(self, encoder: OpenClipEncoder, head: AestheticHead):
        if head.in_dim != encoder.embed_dim:
            raise ValueError(
                f"aesthetic: the head takes {head.in_dim}-d embeddings but the open_clip backbone gives "
                f"{encoder.embed_dim}-d ones; the LAION head needs ViT-L-14 (768-d)")
        self.encoder = encoder
        self.head = head.to(encoder.device)

    @torch.inference_mode()
    def __call__(self, images, prompts: Sequence[str] | None = None) -> np.ndarray:
        images = as_uint8_images(images)
        embeddings = self.encoder.image_features(images)
        return self.head(embeddings).cpu().numpy().astype(np.float32)


@register("aesthetic")
def build_aesthetic(
    model_name: str = "ViT-L-14",
    pretrained: str | None = None,
    head_path: str | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
    precision: str = "fp32",
    local_files_only: bool = True,
    batch_size: int = 32,
    quick_gelu: bool | None = None,
) -> AestheticScore:
    """The LAION aesthetic score; `pretrained` defaults to 'openai' for built-in model names."""
    pretrained = default_pretrained(model_name, pretrained)
    head = load_head(head_path)
    encoder = OpenClipEncoder(model_name, pretrained, cache_dir, device, precision, local_files_only, batch_size,
                              quick_gelu)
    return AestheticScore(encoder, head)
