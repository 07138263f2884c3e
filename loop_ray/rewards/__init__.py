"""Rewards: one module per reward, a registry by name, one calling convention.

A reward is built once per reward actor with `build_reward(name, **kwargs)` and then called as
`reward(images, prompts) -> np.ndarray float32 [B]`, with `images` uint8 [B, H, W, 3] (numpy or
torch) and `prompts` a list of B strings. A module registers its builder with `@register("name")`;
`REWARD_MODULES` lists the modules imported on first lookup.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


class Reward(Protocol):
    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray: ...


_REGISTRY: dict[str, Callable[..., Reward]] = {}

# modules that register rewards; imported lazily so a reward's heavy imports load only when used
REWARD_MODULES = (
    "loop_ray.toy.reward",
    "loop_ray.rewards.jpeg",
    "loop_ray.rewards.aesthetic",
    "loop_ray.rewards.clip_score",
    "loop_ray.rewards.blip_vqa",
)


def register(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    def wrap(builder: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"reward {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return wrap


def _import_all() -> None:
    for module in REWARD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a missing dependency inside the module is a real error
                raise


def available_rewards() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def build_reward(name: str, **kwargs) -> Reward:
    """Build the reward registered as `name` (loads its model once)."""
    _import_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; registered rewards: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def as_uint8_images(images) -> np.ndarray:
    """Images as a uint8 numpy array [B, H, W, 3]; raises on any other shape or dtype."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"rewards take uint8 images [B, H, W, 3]; got {images.dtype} {tuple(images.shape)}")
    return images
