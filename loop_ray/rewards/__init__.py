"""Rewards: one module per reward, a registry by name, one calling convention.

A reward is built once per reward actor with `build_reward(name, **kwargs)` and then called as
`reward(images, prompts) -> np.ndarray float32 [B]`, with `images` uint8 [B, H, W, 3] (numpy or
torch) and `prompts` a list of B strings. A module registers its builder with `@register("name")`;
`REWARD_MODULES` lists the modules imported on first lookup.

A reward name may also be an import path "package.module:attr" (a user's reward, no registration
needed): `attr` is a builder called once with the term's kwargs that returns the reward (like a
registered builder; a class whose instances are called as above is one), or, when the kwargs do
not fit it as a builder but (images, prompts) do, the reward itself, called with the kwargs added.
What a reward returns is checked by `loop_ray.rewards.checks`, never trusted.
"""

from __future__ import annotations

import functools
import importlib
import inspect
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
    "loop_ray.rewards.http",
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


def is_import_path(name: str) -> bool:
    return ":" in name


def load_import_path(path: str) -> Callable:
    """The callable named by "package.module:attr" (attr may be dotted). Errors name the path:
    ValueError for a malformed path, ImportError for a missing module or attribute, TypeError for
    an attribute that is not callable."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {path!r}: an import path is written 'package.module:callable'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"reward {path!r}: cannot import {module_name!r}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"reward {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"reward {path!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def _fits(fn: Callable, *args, **kwargs) -> bool:
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): assume it is a builder
        return not args
    return True


def _build_imported(path: str, kwargs: dict) -> Reward:
    obj = load_import_path(path)
    if not inspect.isclass(obj) and not _fits(obj, **kwargs) and _fits(obj, None, None, **kwargs):
        return functools.partial(obj, **kwargs) if kwargs else obj  # the reward itself
    return obj(**kwargs)


def registered_builder(name: str) -> Callable[..., Reward]:
    """The builder registered as `name` (KeyError listing the registered names when none is).
    A builder may carry `check_kwargs(kwargs, prefix)`, which raises a one-line ValueError naming
    each bad kwarg as `PREFIX.key` without building anything (the driver runs it before any actor
    starts)."""
    _import_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; registered rewards: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_reward(name: str, **kwargs) -> Reward:
    """Build the reward registered as `name`, or named by the import path `name` (loads its model
    once)."""
    if is_import_path(name):
        return _build_imported(name, kwargs)
    return registered_builder(name)(**kwargs)


def as_uint8_images(images) -> np.ndarray:
    """Images as a uint8 numpy array [B, H, W, 3]; raises on any other shape or dtype."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"rewards take uint8 images [B, H, W, 3]; got {images.dtype} {tuple(images.shape)}")
    return images
