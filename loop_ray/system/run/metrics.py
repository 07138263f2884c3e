"""One iteration's metrics record (a flat dict; keys are TensorBoard and W&B tags), and which of its
values the scalar loggers get (`scalars`).

Throughput per role is images per second of busy time, summed over the role's actors:
sampler = images sampled / sampling seconds, reward = images scored / scoring seconds, learner =
samples learned from (once per sample, whatever the epochs) / update seconds. `throughput/
images_per_s` is the end-to-end rate: images sampled / iteration wall time.
"""

from __future__ import annotations

import math

import numpy as np

from loop_ray.system.roles.buffer import LearnBatch
from loop_ray.system.roles.weights import PublishedWeights
from loop_ray.system.run.rollout import RolloutResult

_MEAN_KEYS = ("loss", "clip_fraction", "approx_kl", "kl_ref", "ratio_mean", "grad_norm", "last_clip_fraction",
              # forward-process objectives (loop_ray.training.forward_update)
              "old_decay", "r_mean", "nft_positive_loss", "nft_negative_loss", "old_deviation")


def scalars(record: dict) -> dict[str, float]:
    """The values of a record that the scalar loggers (TensorBoard, W&B) get: finite ints and
    floats, not bools, not lists or strings (those stay in metrics.jsonl only)."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _per_actor(stats: list[dict], count: str) -> tuple[list[float], float]:
    """Work per actor rank (by `count`) and the summed per-actor rate count/seconds."""
    work: dict[int, float] = {}
    busy: dict[int, float] = {}
    for s in stats:
        work[s["rank"]] = work.get(s["rank"], 0.0) + s[count]
        busy[s["rank"]] = busy.get(s["rank"], 0.0) + s["seconds"]
    ranks = range(max(work) + 1) if work else range(0)
    rate = sum(work[r] / busy[r] for r in work if busy[r] > 0)
    return [work.get(r, 0.0) for r in ranks], rate


def iteration_record(
    iteration: int,
    version: int,
    images_seen: int,
    rollout: RolloutResult,
    batch: LearnBatch,
    learner: list[dict],
    weights: PublishedWeights | None,
    digests: list[str],
    incomplete: int,
    seconds: float,
) -> dict:
    rewards = rollout.rewards[~np.isnan(rollout.rewards)]
    staleness = version - 1 - batch.versions  # versions between sampling and learning, per sample
    rec: dict = {
        "kind": "train",
        "iteration": iteration,
        "version": version,
        "images_seen": images_seen,
        "train/reward_mean": float(rewards.mean()) if rewards.size else float("nan"),
        "train/reward_std": float(rewards.std()) if rewards.size else float("nan"),
        "train/samples_learned": len(batch),
        "train/incomplete_samples_dropped": incomplete,
        "train/stale_groups_dropped": batch.dropped_stale,
        "train/rejected_groups": batch.rejected_groups,  # an invalid reward (NaN, inf, shape, error)
        "train/rejected_images": rollout.rejected_images,
        "train/failed_calls": rollout.failures,
        "faults/sampler_jobs_regenerated": rollout.regenerated,
        "faults/reward_calls_repeated": rollout.rescored,
        "train/groups_learned": len(set(batch.group_ids.tolist())),
        "train/advantage_abs_mean": float(batch.advantages.abs().mean()) if len(batch) else float("nan"),
        "staleness/mean": float(np.mean(staleness)) if len(batch) else float("nan"),
        "staleness/max": int(np.max(staleness)) if len(batch) else 0,
        # histogram: samples learned at staleness 0, 1, 2, ... versions
        "staleness/counts": np.bincount(staleness).tolist() if len(batch) else [],
        "iteration_seconds": seconds,
        "throughput/images_per_s": len(rollout.rewards) / seconds if seconds > 0 else float("nan"),
    }
    for name, values in rollout.parts.items():
        rec[f"train/term/{name}"] = float(np.nanmean(values))
    sampler_work, rec["throughput/sampler_images_per_s"] = _per_actor(rollout.sampler_stats, "images")
    reward_work, rec["throughput/reward_images_per_s"] = _per_actor(rollout.reward_stats, "images")
    rec["work/sampler_images"] = sampler_work
    rec["work/reward_images"] = reward_work
    if learner:
        for key in _MEAN_KEYS:
            values = [m[key] for m in learner if key in m]  # kl_ref only with algorithm.kl_beta > 0
            if values:
                rec[f"learner/{key}"] = float(np.nanmean(values))
        rec["learner/ratio_min"] = min(m["ratio_min"] for m in learner)
        rec["learner/ratio_max"] = max(m["ratio_max"] for m in learner)
        rec["learner/grad_norm_max"] = max(m["grad_norm_max"] for m in learner)
        rec["learner/first_ratio_max_abs_dev"] = max(m["first_ratio_max_abs_dev"] for m in learner)
        rec["learner/optimizer_steps"] = learner[0]["optimizer_steps"]
        rec["learner/micro_steps"] = learner[0]["micro_steps"]  # minibatches x sampled steps, per worker
        rec["learner/seconds"] = max(m["seconds"] for m in learner)
        learner_work, rec["throughput/learner_images_per_s"] = _per_actor(learner, "samples")
        rec["work/learner_samples"] = learner_work
    rec.update(idle_fractions(rollout.sampler_stats, learner, seconds))
    rec["weights/sampler_load_seconds"] = max((s["weight_load_seconds"] for s in rollout.sampler_stats), default=0.0)
    if weights is not None:
        rec["weights/publish_seconds"] = weights.publish_seconds
        rec["weights/bytes"] = weights.num_bytes
    if digests:
        rec["learner/weights_digests"] = digests
        rec["learner/weights_in_sync"] = len(set(digests)) == 1
    return rec


def idle_fractions(sampler_stats: list[dict], learner: list[dict], seconds: float) -> dict[str, float]:
    """Share of the iteration's wall time each role waited: samplers (mean over the sampler calls
    collected this iteration) and the learner (its slowest rank). In sync mode the samplers wait
    while the learner trains and the other way round; async mode overlaps the two."""
    if seconds <= 0:
        return {}
    out = {}
    if sampler_stats:
        busy = np.mean([s["seconds"] for s in sampler_stats])
        out["idle/sampler_fraction"] = float(np.clip(1.0 - busy / seconds, 0.0, 1.0))
    if learner:
        out["idle/learner_fraction"] = float(np.clip(1.0 - max(m["seconds"] for m in learner) / seconds, 0.0, 1.0))
    return out
