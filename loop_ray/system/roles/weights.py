"""Versioned weight publication from the learner to the samplers.

After each learner phase, learner rank 0 publishes the trainable state dict once; every sampler
loads the newest version before its next batch. A strategy is a `WeightSync`: `publish` runs on
learner rank 0 and returns a small, picklable `PublishedWeights` handle that the driver passes to
the samplers; `load` runs on a sampler. `ObjectStoreWeightSync` is the strategy for every cluster
(one `ray.put`, read by each sampler from the object store); an NCCL broadcast strategy for GPU
clusters would be another file implementing the same two methods.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class PublishedWeights:
    """A published version. `payload` is what the strategy needs to load it (for the object
    store: the ObjectRef of the state dict, nested in the handle so Ray does not resolve it when
    the handle is passed as an argument)."""

    version: int
    num_bytes: int
    publish_seconds: float
    payload: Any = field(default=None, repr=False)
    # which learner group published it (0, then 1, 2, ... for groups rebuilt after a lost rank):
    # a rebuilt group restored from a checkpoint publishes its own version v, not the lost one's
    generation: int = 0


class WeightSync(ABC):
    @abstractmethod
    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> PublishedWeights:
        """Make `state_dict` available as `version` (called once per version, on learner rank 0)."""

    @abstractmethod
    def fetch(self, handle: PublishedWeights) -> dict[str, torch.Tensor]:
        """The state dict of a published version (called on a sampler)."""

    def load(self, policy, handle: PublishedWeights) -> float:
        """Load a published version into `policy`; returns the seconds it took."""
        start = time.perf_counter()
        policy.load_trainable_state_dict(self.fetch(handle))
        return time.perf_counter() - start


def state_dict_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


class ObjectStoreWeightSync(WeightSync):
    """One `ray.put` per version; samplers `ray.get` it (zero-copy on the same node)."""

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> PublishedWeights:
        import ray

        start = time.perf_counter()
        ref = ray.put(state_dict)
        return PublishedWeights(version, state_dict_bytes(state_dict), time.perf_counter() - start, ref)

    def fetch(self, handle: PublishedWeights) -> dict[str, torch.Tensor]:
        import ray

        return ray.get(handle.payload)
