"""SamplerActor: a policy copy that turns prompts and seeds into trajectories.

`generate` returns several objects (Ray `num_returns`): the TrajectoryBatch (for the learner), a
small stats dict (for the driver), and the decoded images cut into chunks of
`{"images", "prompts"}` (for the reward actors). The driver passes the chunks' ObjectRefs on to the
reward actors, so images go from sampler to reward actor through the object store and never
through the driver.
"""

from __future__ import annotations

import itertools
import time

import ray
import torch

from loop_ray.config import ExperimentConfig
from loop_ray.system.roles.actors import CONCURRENCY_GROUPS, LIVENESS_GROUP
from loop_ray.system.roles.weights import ObjectStoreWeightSync, PublishedWeights
from loop_ray.trajectory import TrajectoryBatch
from loop_ray.utils import pin_threads


def chunk_bounds(num_samples: int, num_chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of `num_chunks` nearly equal consecutive chunks of `num_samples` samples."""
    bounds = torch.linspace(0, num_samples, num_chunks + 1).round().long().tolist()
    return list(itertools.pairwise(bounds))


def image_chunks(batch: TrajectoryBatch, num_chunks: int) -> list[dict]:
    """The batch's images and prompts cut into `num_chunks` chunks (see `chunk_bounds`)."""
    return [
        {"images": batch.images[a:b], "prompts": batch.prompts[a:b], "start": a}
        for a, b in chunk_bounds(len(batch), num_chunks)
    ]


class SamplerActor:
    """Holds one policy built from the config on this actor's device; `version` is the policy
    version its weights are at (0 = the initial weights every role builds from the config)."""

    def __init__(self, cfg: dict, rank: int = 0):
        self.cfg = ExperimentConfig.model_validate(cfg)
        pin_threads(self.cfg.cluster.torch_threads)
        from loop_ray.diffusion.factory import build_policy

        self.rank = rank
        self.device = "cuda" if self.cfg.cluster.sampler_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.policy = build_policy(self.cfg, self.device)
        self.version = 0
        self.generation = 0  # of the learner group whose weights it holds (PublishedWeights.generation)
        self.weight_sync = ObjectStoreWeightSync()
        self.images_done = 0

    def _use_version(self, version: int, weights: PublishedWeights | None) -> float:
        """Load `weights` unless this actor holds that version (of that learner group) already;
        returns the load seconds."""
        if version == self.version and (weights is None or weights.generation == self.generation):
            return 0.0
        if weights is None or weights.version != version:
            have = None if weights is None else weights.version
            raise ValueError(f"sampler {self.rank}: asked for policy version {version}, given weights of {have}")
        try:
            seconds = self.weight_sync.load(self.policy, weights)
        except ray.exceptions.ObjectLostError as err:  # its publisher (learner rank 0) is gone
            raise RuntimeError(f"sampler {self.rank}: policy version {version} is no longer available "
                               f"({type(err).__name__}); its publisher was lost") from None
        self.version, self.generation = version, weights.generation
        return seconds

    def _sample(self, prompts, prompt_ids, group_ids, seeds, k, version, weights, sde_steps=None, design=False):
        """`design`: sample with the training design (sde_steps, sampling.group_noise); evaluation
        samples every step stochastically with independent noise."""
        load_seconds = self._use_version(version, weights)
        start = time.perf_counter()
        batch = self.policy.sample(
            list(prompts),
            k,
            seeds,
            prompt_ids=prompt_ids,
            group_ids=group_ids,
            batch_size=self.cfg.sampling.batch_size,
            version=self.version,
            sde_steps=sde_steps if design else None,
            group_noise=self.cfg.sampling.group_noise if design else "independent",
            clean_only=self.cfg.algorithm.objective != "policy_gradient",  # forward-process objectives
        )
        seconds = time.perf_counter() - start
        self.images_done += len(batch)
        stats = {
            "rank": self.rank,
            "images": len(batch),
            "seconds": seconds,
            "weight_load_seconds": load_seconds,
            "version": self.version,
        }
        return batch, stats

    def generate(
        self,
        prompts: list[str],
        prompt_ids: list[int],
        group_ids: list[int],
        seeds: list[int],
        k: int,
        version: int,
        weights: PublishedWeights | None = None,
        num_chunks: int = 1,
        sde_steps: list[int] | None = None,
    ):
        """K trajectories per prompt with the policy at `version` (loaded from `weights` if this
        actor is behind), stochastic at `sde_steps` (None: all). Call with
        `.options(num_returns=2 + num_chunks)`; returns (TrajectoryBatch, stats, *image chunks)."""
        batch, stats = self._sample(prompts, prompt_ids, group_ids, seeds, k, version, weights, sde_steps, True)
        return (batch, stats, *image_chunks(batch, num_chunks))

    def generate_images(
        self,
        prompts: list[str],
        seeds: list[int],
        k: int,
        version: int,
        weights: PublishedWeights | None = None,
        num_chunks: int = 1,
    ):
        """Evaluation: like `generate` but keeps only the images (no trajectory leaves the actor).
        Call with `.options(num_returns=1 + num_chunks)`; returns (stats, *image chunks)."""
        ids = list(range(len(prompts)))
        batch, stats = self._sample(prompts, ids, ids, seeds, k, version, weights)
        return (stats, *image_chunks(batch, num_chunks))

    def weights_digest(self) -> str:
        """Hash of this sampler's trainable weights (equal to the learner's once a version is loaded)."""
        from loop_ray.system.roles.learner import state_digest

        return state_digest(self.policy.trainable_state_dict())

    @ray.method(concurrency_group=LIVENESS_GROUP)
    def ping(self) -> int:
        """Answers while a call samples (its own concurrency group): alive, not idle."""
        return self.rank


RemoteSampler = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(SamplerActor)
