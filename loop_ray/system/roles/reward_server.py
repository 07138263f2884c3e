"""Reward actors and the driver's handle on them.

Each reward actor loads its share of the configured reward terms once and scores image chunks.
The driver hands it the ObjectRef of an image chunk produced by a sampler; Ray resolves it on the
reward actor's node, so images never pass through the driver.

The terms are split into groups (`loop_ray.rewards.composite.term_groups`): the terms without a
Ray runtime_env of their own are scored by the shared reward actors, and each distinct runtime_env
gets reward actors of its own started in it (its packages, code or container exist only there).
`RewardPool` sends every chunk to one actor of each group (the one with the fewest chunks in
flight), sends a group's call again when its actor was lost, and adds the groups' results up
(`combine_scores`): a chunk is scored once per group, and used only when every group answered.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import ray

from loop_ray.config import ExperimentConfig
from loop_ray.rewards.checks import describe_problems
from loop_ray.rewards.composite import combine_scores
from loop_ray.system.roles.actors import CONCURRENCY_GROUPS, LIVENESS_GROUP, get_or_none
from loop_ray.utils import pin_threads

log = logging.getLogger(__name__)


class RewardActor:
    """Scores the reward terms at indices `terms` (all when None). `environ` is set in the actor's
    environment before the terms are built: the driver's values of the variables the terms read
    secrets from (http's token_env), handed over in memory so they are never written down."""

    def __init__(self, cfg: dict, rank: int = 0, terms: list[int] | None = None,
                 environ: dict[str, str] | None = None):
        self.cfg = ExperimentConfig.model_validate(cfg)
        pin_threads(self.cfg.cluster.torch_threads)
        os.environ.update(environ or {})
        from loop_ray.rewards.composite import CompositeReward

        self.rank = rank
        self.reward = CompositeReward.from_config(self.cfg.reward, terms)
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

    @ray.method(concurrency_group=LIVENESS_GROUP)
    def ping(self) -> int:
        """Answers while a call scores (its own concurrency group): alive, not idle."""
        return self.rank


RemoteRewardActor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RewardActor)


class RewardGroup:
    """Driver-side handle on the reward actors of one term group (an ActorSet)."""

    def __init__(self, actors):
        if not len(actors):
            raise ValueError("a reward group needs at least one reward actor")
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

    def actor_of(self, ref):
        """The actor serving a call's result `ref` (None once forgotten)."""
        i = self._served_by.get(ref)
        return None if i is None else self.actors[i]

    def forget(self, ref) -> None:
        """Drop the group's hold on a finished call's result (else the object store keeps it)."""
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


@dataclass
class RewardCall:
    """One chunk sent to every term group: the chunk's ref and each group's result ref."""

    chunk_ref: object
    refs: list


class RewardPool:
    """Driver-side handle on all reward actors: one RewardGroup per term group (the shared group,
    when there is one, first)."""

    def __init__(self, groups: list[RewardGroup]):
        if not groups:
            raise ValueError("RewardPool needs at least one reward group")
        self.groups = list(groups)

    @property
    def actors(self):
        """The first group's ActorSet (the shared reward actors when some terms have no runtime_env)."""
        return self.groups[0].actors

    def submit(self, chunk_ref) -> RewardCall:
        """Score one image chunk (an ObjectRef) on one actor of every group."""
        return RewardCall(chunk_ref, [g.submit(chunk_ref) for g in self.groups])

    def result(self, call: RewardCall, retries: int, what: str = "reward call",
               timeout_s: float | None = None) -> tuple[dict | None, int]:
        """The chunk's combined result and the number of calls made again. A group's call that
        failed (its actor lost) is sent again, with the same chunk, up to `retries` times; when one
        still fails, the result is None (the chunk's groups are then never used) and the other
        groups' results are dropped, so no image is ever used with a partial reward."""
        partials, repeated = [], 0
        for g, (group, ref) in enumerate(zip(self.groups, call.refs)):
            label = what if len(self.groups) == 1 else f"{what} (reward group {g})"
            result, attempt = get_or_none(ref, label, timeout_s, group.actor_of(ref)), 0
            while result is None and attempt < retries:
                attempt += 1
                try:
                    ref = group.retry(call.chunk_ref, ref, attempt)
                except ray.exceptions.RayError as err:
                    log.warning("reward actor cannot be revived: %s", str(err).splitlines()[0])
                    break
                result = get_or_none(ref, f"{label}, attempt {attempt + 1}", timeout_s, group.actor_of(ref))
            repeated += attempt
            group.forget(ref)
            partials.append(result)
        if any(p is None for p in partials):
            return None, repeated
        return (partials[0] if len(partials) == 1 else combine_scores(partials)), repeated

    @property
    def replaced(self) -> int:
        return sum(g.actors.replaced for g in self.groups)

    def kill_all(self) -> None:
        for g in self.groups:
            g.actors.kill_all()
