"""Fan a plan out to the samplers and chain each sampler's image chunks to the reward pool.

`dispatch` only submits work and returns ObjectRefs: sampler s gets a whole-prompt share of the
plan and returns (trajectories, stats, image chunks...); each chunk's ref goes straight to a
reward actor. `collect` waits for the small results (stats, rewards) and, for training, records
each batch's ref and its rewards in the buffer. A sampler or reward call that fails is logged and
left out; the buffer then never uses the groups it touched.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import ray

from loop_ray.system.buffer import TrajectoryBuffer
from loop_ray.system.plan import Plan, SamplerJob
from loop_ray.system.reward_server import RewardPool
from loop_ray.system.sampler import chunk_bounds
from loop_ray.system.weights import PublishedWeights

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    plan: Plan
    version: int
    jobs: list[SamplerJob]
    job_offsets: list[int]  # first sample of each job in plan order
    batch_refs: list  # per job; None for evaluation
    stats_refs: list
    chunk_refs: list[list]  # per job: the image chunks' refs
    chunk_spans: list[list[tuple[int, int]]]  # per job: each chunk's [start, stop) in plan order
    reward_refs: list[tuple[int, object]]  # (job, ref of the reward result)
    started: float = field(default_factory=time.perf_counter)


def _num_chunks(num_samples: int, num_jobs: int, reward_batch_size: int, num_reward_actors: int) -> int:
    """Chunks per sampler: reward batches of at most `reward_batch_size`, and enough chunks over
    all samplers to give every reward actor one where there are images enough."""
    wanted = max(math.ceil(num_samples / reward_batch_size), math.ceil(num_reward_actors / num_jobs))
    return max(1, min(num_samples, wanted))


def dispatch(
    samplers: list,
    pool: RewardPool,
    plan: Plan,
    version: int,
    weights: PublishedWeights | None,
    reward_batch_size: int,
    *,
    evaluation: bool = False,
) -> Rollout:
    jobs = plan.split(len(samplers))
    offsets = list(np.cumsum([0] + [j.num_samples for j in jobs])[:-1])
    batch_refs, stats_refs, chunk_refs, chunk_spans, reward_refs = [], [], [], [], []
    for j, (sampler, job) in enumerate(zip(samplers, jobs)):
        n = _num_chunks(job.num_samples, len(jobs), reward_batch_size, len(pool.actors))
        if evaluation:
            stats_ref, *chunks = sampler.generate_images.options(num_returns=1 + n).remote(
                job.prompts, job.seeds, plan.k, version, weights, n
            )
            batch_ref = None
        else:
            batch_ref, stats_ref, *chunks = sampler.generate.options(num_returns=2 + n).remote(
                job.prompts, job.prompt_ids, job.group_ids, job.seeds, plan.k, version, weights, n
            )
        batch_refs.append(batch_ref)
        stats_refs.append(stats_ref)
        chunk_refs.append(chunks)
        chunk_spans.append([(offsets[j] + a, offsets[j] + b) for a, b in chunk_bounds(job.num_samples, n)])
        reward_refs += [(j, pool.submit(c)) for c in chunks]
    return Rollout(
        plan, version, jobs, [int(o) for o in offsets], batch_refs, stats_refs, chunk_refs, chunk_spans, reward_refs
    )


@dataclass
class RolloutResult:
    rewards: np.ndarray  # [N] in plan order; NaN where a call failed
    parts: dict[str, np.ndarray]  # each reward term's values [N]
    sampler_stats: list[dict]
    reward_stats: list[dict]  # one per reward call: rank, images, seconds
    seconds: float
    failures: int
    entry_ids: list[int | None] = field(default_factory=list)  # buffer entries (training)


def _get(ref, what: str):
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:
        log.warning("%s failed and is left out: %s", what, err)
        return None


def collect(rollout: Rollout, buffer: TrajectoryBuffer | None = None) -> RolloutResult:
    """Wait for the rollout's stats and rewards; with a buffer, register every batch whose
    sampler succeeded and set the rewards that came back."""
    total = len(rollout.plan.seeds)
    rewards = np.full(total, np.nan, np.float32)
    parts: dict[str, np.ndarray] = {}
    failures = 0
    sampler_stats, entry_ids = [], []
    for j, job in enumerate(rollout.jobs):
        stats = _get(rollout.stats_refs[j], f"sampler call {j}")
        failures += stats is None
        if stats is not None:
            sampler_stats.append(stats)
        entry = None
        if buffer is not None and stats is not None:
            k = rollout.plan.k
            entry = buffer.add(
                rollout.batch_refs[j], rollout.version,
                np.repeat(job.group_ids, k), [p for p in job.prompts for _ in range(k)],
            )
        entry_ids.append(entry)
    reward_stats = []
    for j, ref in rollout.reward_refs:
        result = _get(ref, f"reward call for sampler share {j}")
        if result is None:
            failures += 1
            continue
        first = rollout.job_offsets[j] + result["start"]
        rewards[first : first + result["images"]] = result["rewards"]
        for name, values in result["parts"].items():
            parts.setdefault(name, np.full(total, np.nan, np.float32))[first : first + result["images"]] = values
        if buffer is not None and entry_ids[j] is not None:
            buffer.set_rewards(entry_ids[j], result["start"], result["rewards"])
        reward_stats.append({k: result[k] for k in ("rank", "images", "seconds")})
    return RolloutResult(
        rewards, parts, sampler_stats, reward_stats, time.perf_counter() - rollout.started, failures, entry_ids
    )


def fetch_images(rollout: Rollout, samples: list[int]) -> dict[int, np.ndarray]:
    """Images of the given samples (plan order) of a rollout, pulled to the driver for an image
    grid; only the chunks that hold them are fetched. Samples of failed calls are missing."""
    wanted, out = set(samples), {}
    for refs, spans in zip(rollout.chunk_refs, rollout.chunk_spans):
        for ref, (a, b) in zip(refs, spans):
            if wanted.isdisjoint(range(a, b)):
                continue
            chunk = _get(ref, "image chunk")
            if chunk is not None:
                out.update({i: np.asarray(chunk["images"][i - a]) for i in range(a, b) if i in wanted})
    return out
