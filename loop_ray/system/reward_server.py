"""RewardActor pool: each actor loads the configured reward once and scores image chunks.

The driver hands a reward actor the ObjectRef of an image chunk produced by a sampler; Ray
resolves it on the reward actor's node, so images never pass through the driver. `RewardPool`
spreads chunks over the actors (the one with the fewest chunks in flight first).
"""

from __future__ import annotations

import time

import numpy as np
import ray

from loop_ray.config import ExperimentConfig
from loop_ray.utils import pin_threads


class RewardActor:
    def __init__(self, cfg: dict, rank: int = 0):
        self.cfg = ExperimentConfig.model_validate(cfg)
        pin_threads(self.cfg.cluster.torch_threads)
        from loop_ray.rewards.composite import CompositeReward

        self.rank = rank
        self.reward = CompositeReward.from_config(self.cfg.reward)
        self.images_done = 0

    def score(self, chunk: dict) -> dict:
        """Score `{"images": uint8 [B, H, W, 3], "prompts": [B], "start": int}`; returns the total
        reward [B], each term's values, and timing."""
        images, prompts = chunk["images"], chunk["prompts"]
        start = time.perf_counter()
        totals, parts = [], {name: [] for name in self.reward.names}
        step = self.cfg.reward.batch_size
        for a in range(0, len(prompts), step):
            total, part = self.reward.score(images[a : a + step], prompts[a : a + step])
            totals.append(total)
            for name, values in part.items():
                parts[name].append(values)
        self.images_done += len(prompts)
        return {
            "rank": self.rank,
            "start": chunk["start"],
            "rewards": np.concatenate(totals).astype(np.float32) if totals else np.zeros(0, np.float32),
            "parts": {n: np.concatenate(v) if v else np.zeros(0, np.float32) for n, v in parts.items()},
            "images": len(prompts),
            "seconds": time.perf_counter() - start,
        }

    def ping(self) -> int:
        return self.rank


RemoteRewardActor = ray.remote(RewardActor)


class RewardPool:
    """Driver-side handle on the reward actors."""

    def __init__(self, actors: list):
        if not actors:
            raise ValueError("RewardPool needs at least one reward actor")
        self.actors = actors
        self._in_flight: list[list] = [[] for _ in actors]

    def submit(self, chunk_ref) -> ray.ObjectRef:
        """Score one image chunk (an ObjectRef) on the least busy actor; returns the result's ref."""
        for refs in self._in_flight:  # forget finished calls
            if refs:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for r in done:
                    refs.remove(r)
        i = min(range(len(self.actors)), key=lambda j: len(self._in_flight[j]))
        ref = self.actors[i].score.remote(chunk_ref)
        self._in_flight[i].append(ref)
        return ref
