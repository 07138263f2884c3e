"""Fan a plan out to the samplers and chain each sampler's image chunks to the reward pool.

`dispatch` only submits work and returns ObjectRefs: sampler s gets a whole-prompt share of the
plan and returns (trajectories, stats, image chunks...); each chunk's ref goes straight to a
reward actor. `collect` waits for the small results (stats, rewards) and, for training, records
each batch's ref and its rewards in the buffer. A sampler call that fails (its actor lost) is sent
again with the same prompts and seeds, a reward call again with the same image chunk, to a
restarted or replacement actor (`loop_ray.system.roles.actors`); only a call that fails every retry is
left out, and the buffer then never uses the groups it touched. A call still unanswered at its
deadline (`call_timeout_s`) counts as failed and is sent again the same way.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import ray

from loop_ray.system.roles.actors import ActorSet, get_or_none
from loop_ray.system.roles.buffer import TrajectoryBuffer
from loop_ray.system.roles.reward_server import RewardPool
from loop_ray.system.roles.sampler import chunk_bounds
from loop_ray.system.roles.weights import PublishedWeights
from loop_ray.training.plan import Plan, SamplerJob

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
    reward_refs: list[tuple[int, int, object]]  # (job, chunk, RewardCall scoring it)
    samplers: ActorSet  # where a lost job is sent again
    pool: RewardPool
    weights: PublishedWeights | None = None
    reward_batch_size: int = 1
    evaluation: bool = False
    started: float = field(default_factory=time.perf_counter)


def _num_chunks(num_samples: int, num_jobs: int, reward_batch_size: int, num_reward_actors: int) -> int:
    """Chunks per sampler: reward batches of at most `reward_batch_size`, and enough chunks over
    all samplers to give every reward actor one where there are images enough."""
    wanted = max(math.ceil(num_samples / reward_batch_size), math.ceil(num_reward_actors / num_jobs))
    return max(1, min(num_samples, wanted))


def _submit_job(rollout: Rollout, j: int, sampler) -> None:
    """Send job j (its prompts and seeds) to `sampler` and its image chunks on to the reward pool,
    replacing whatever refs job j had."""
    job, plan = rollout.jobs[j], rollout.plan
    n = _num_chunks(job.num_samples, len(rollout.jobs), rollout.reward_batch_size, len(rollout.pool.actors))
    if rollout.evaluation:
        stats_ref, *chunks = sampler.generate_images.options(num_returns=1 + n).remote(
            job.prompts, job.seeds, plan.k, rollout.version, rollout.weights, n
        )
        batch_ref = None
    else:
        batch_ref, stats_ref, *chunks = sampler.generate.options(num_returns=2 + n).remote(
            job.prompts, job.prompt_ids, job.group_ids, job.seeds, plan.k, rollout.version, rollout.weights, n,
            job.sde_steps,
        )
    rollout.batch_refs[j], rollout.stats_refs[j], rollout.chunk_refs[j] = batch_ref, stats_ref, chunks
    first = rollout.job_offsets[j]
    rollout.chunk_spans[j] = [(first + a, first + b) for a, b in chunk_bounds(job.num_samples, n)]
    rollout.reward_refs = [r for r in rollout.reward_refs if r[0] != j]
    rollout.reward_refs += [(j, c, rollout.pool.submit(ref)) for c, ref in enumerate(chunks)]


def dispatch(
    samplers: ActorSet,
    pool: RewardPool,
    plan: Plan,
    version: int,
    weights: PublishedWeights | None,
    reward_batch_size: int,
    *,
    evaluation: bool = False,
) -> Rollout:
    jobs = plan.split(len(samplers))
    offsets = [int(o) for o in np.cumsum([0] + [j.num_samples for j in jobs])[:-1]]
    empty = [None] * len(jobs)
    rollout = Rollout(
        plan, version, jobs, offsets, list(empty), list(empty), [[] for _ in jobs], [[] for _ in jobs], [],
        samplers, pool, weights, reward_batch_size, evaluation,
    )
    for j in range(len(jobs)):
        _submit_job(rollout, j, samplers[j])
    return rollout


@dataclass
class RolloutResult:
    rewards: np.ndarray  # [N] in plan order; NaN where a call failed
    parts: dict[str, np.ndarray]  # each reward term's values [N]
    sampler_stats: list[dict]
    reward_stats: list[dict]  # one per reward call: rank, images, seconds
    seconds: float
    failures: int  # calls that failed even after their retries (their groups are not used)
    entry_ids: list[int | None] = field(default_factory=list)  # buffer entries (training)
    regenerated: int = 0  # sampler jobs sampled again (same prompts and seeds) after a failure
    rescored: int = 0  # reward calls made again after a failure
    rejected_images: int = 0  # scored invalid (NaN, inf, wrong shape, error): NaN in `rewards`
    problems: list[str] = field(default_factory=list)  # what the reward terms got wrong


def _stats_with_retries(rollout: Rollout, j: int, retries: int,
                        call_timeout_s: float | None = None) -> tuple[dict | None, int]:
    """Job j's sampler stats; when its call failed, the job is sent again with the same prompts
    and seeds (to sampler j once Ray restarted it or a fresh one replaced it, then to the next
    samplers), so the lost trajectories are regenerated exactly. Returns (stats, times resent)."""
    stats = get_or_none(rollout.stats_refs[j], f"sampler call {j} (policy version {rollout.version})",
                        call_timeout_s, rollout.samplers[j % len(rollout.samplers)])
    attempt = 0
    while stats is None and attempt < retries:
        attempt += 1
        i = (j + attempt - 1) % len(rollout.samplers)
        try:
            sampler = rollout.samplers.revive(i)
        except ray.exceptions.RayError as err:
            log.warning("sampler %d cannot be revived: %s", i, str(err).splitlines()[0])
            continue
        log.warning("sampling job %d again on sampler %d with the same prompts and seeds (attempt %d)", j, i, attempt)
        _submit_job(rollout, j, sampler)
        stats = get_or_none(rollout.stats_refs[j], f"sampler call {j}, attempt {attempt + 1}", call_timeout_s, sampler)
    return stats, attempt


def collect(rollout: Rollout, buffer: TrajectoryBuffer | None = None, retries: int = 2,
            call_timeout_s: float | None = None) -> RolloutResult:
    """Wait for the rollout's stats and rewards, sending a failed (or, past `call_timeout_s`
    seconds, late) sampler or reward call again up to `retries` times; with a buffer, register
    every batch whose sampler succeeded and set the rewards that came back. A call that still
    fails is counted and its groups never complete."""
    total = len(rollout.plan.seeds)
    rewards = np.full(total, np.nan, np.float32)
    parts: dict[str, np.ndarray] = {}
    failures = regenerated = rescored = 0
    sampler_stats, entry_ids, sampled = [], [], []
    for j, job in enumerate(rollout.jobs):
        stats, resent = _stats_with_retries(rollout, j, retries, call_timeout_s)
        regenerated += resent
        failures += stats is None
        sampled.append(stats is not None)
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
    reward_stats, rejected_images, problems = [], 0, []
    for j, _chunk, call in list(rollout.reward_refs):
        if not sampled[j]:
            continue  # its sampler job failed for good: nothing to score
        result, attempts = rollout.pool.result(call, retries, f"reward call for sampler share {j}", call_timeout_s)
        rescored += attempts
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
        rejected_images += int((~np.isfinite(result["rewards"])).sum())  # the buffer rejects their groups
        problems += result["problems"]
    return RolloutResult(
        rewards, parts, sampler_stats, reward_stats, time.perf_counter() - rollout.started, failures, entry_ids,
        regenerated, rescored, rejected_images, problems,
    )


def fetch_images(rollout: Rollout, samples: list[int]) -> dict[int, np.ndarray]:
    """Images of the given samples (plan order) of a rollout, pulled to the driver for an image
    grid; only the chunks that hold them are fetched. Samples of failed calls are missing."""
    wanted, out = set(samples), {}
    for refs, spans in zip(rollout.chunk_refs, rollout.chunk_spans):
        for ref, (a, b) in zip(refs, spans):
            if wanted.isdisjoint(range(a, b)):
                continue
            chunk = get_or_none(ref, "image chunk")
            if chunk is not None:
                out.update({i: np.asarray(chunk["images"][i - a]) for i in range(a, b) if i in wanted})
    return out
