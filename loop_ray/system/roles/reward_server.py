"""RewardActor pool: each actor loads the configured reward once and scores image chunks.

The driver hands a reward actor the ObjectRef of an image chunk produced by a sampler; Ray
resolves it on the reward actor's node, so images never pass through the driver. `RewardPool`
spreads chunks over the actors (the one with the fewest chunks in flight first).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import ray

from loop_ray.config import ExperimentConfig
from loop_ray.rewards.checks import describe_problems
from loop_ray.utils import pin_threads

log = logging.getLogger(__name__)


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
        reward [B] (NaN where invalid), each term's values, what was wrong
        (one line per failing term call, naming the term) and timing. A term that raises or
        returns NaN, inf or a wrong shape does not fail the call: its images come back invalid."""
        images, prompts = chunk["images"], chunk["prompts"]
        start = time.perf_counter()
        totals, parts, problems = [], {name: [] for name in self.reward.names}, []
        step = self.cfg.reward.batch_size
        for a in range(0, len(prompts), step):
            scores = self.reward.score_checked(images[a : a + step], prompts[a : a + step])
            totals.append(scores.total)
            problems += scores.problems
            for name, values in scores.parts.items():
                parts[name].append(values)
        rewards = np.concatenate(totals).astype(np.float32) if totals else np.zeros(0, np.float32)
        if problems:
            log.warning("reward actor %d: %d of %d images invalid: %s", self.rank,
                        int((~np.isfinite(rewards)).sum()), len(prompts), describe_problems(problems))
        self.images_done += len(prompts)
        return {
            "rank": self.rank,
            "start": chunk["start"],
            "rewards": rewards,
            "problems": problems,
            "parts": {n: np.concatenate(v) if v else np.zeros(0, np.float32) for n, v in parts.items()},
            "images": len(prompts),
            "seconds": time.perf_counter() - start,
        }

    def ping(self) -> int:
        return self.rank


RemoteRewardActor = ray.remote(RewardActor)


class RewardPool:
    """Driver-side handle on the reward actors (an ActorSet)."""

    def __init__(self, actors):
        if not len(actors):
            raise ValueError("RewardPool needs at least one reward actor")
        self.actors = actors
        self._in_flight: list[list] = [[] for _ in range(len(actors))]
        self._served_by: dict = {}  # result ref -> actor index

    def _forget_finished(self) -> None:
        for refs in self._in_flight:
            if refs:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for r in done:
                    refs.remove(r)

    def _submit_to(self, i: int, chunk_ref) -> ray.ObjectRef:
        ref = self.actors[i].score.remote(chunk_ref)
        self._in_flight[i].append(ref)
        self._served_by[ref] = i
        return ref

    def submit(self, chunk_ref) -> ray.ObjectRef:
        """Score one image chunk (an ObjectRef) on the least busy actor; returns the result's ref."""
        self._forget_finished()
        i = min(range(len(self.actors)), key=lambda j: len(self._in_flight[j]))
        return self._submit_to(i, chunk_ref)

    def forget(self, ref) -> None:
        """Drop the pool's hold on a finished call's result (else the object store keeps it)."""
        self._served_by.pop(ref, None)

    def retry(self, chunk_ref, failed_ref, attempt: int = 1) -> ray.ObjectRef:
        """Score a chunk again after the call `failed_ref` failed: on the same actor once Ray has
        restarted it, or on a fresh one started in its place (`ActorSet.revive`); later attempts
        move on to the next actor."""
        i = (self._served_by.pop(failed_ref, 0) + attempt - 1) % len(self.actors)
        if failed_ref in self._in_flight[i]:
            self._in_flight[i].remove(failed_ref)
        self.actors.revive(i)
        return self._submit_to(i, chunk_ref)
