"""The learner's figures of one iteration as metrics (`learner/...`), from the dicts `update_on_shard`
returns, one per learner rank: the same record for the Ray run (every rank) and the single-process
loop (one rank), so both log one schema."""

from __future__ import annotations

import numpy as np

# averaged over ranks; kl_ref only with algorithm.kl_beta > 0; the last five only for the
# forward-process objectives (loop_ray.training.forward_update)
MEAN_KEYS = ("loss", "clip_fraction", "approx_kl", "kl_ref", "ratio_mean", "grad_norm", "last_clip_fraction",
             "old_decay", "r_mean", "nft_positive_loss", "nft_negative_loss", "old_deviation")


def learner_record(per_rank: list[dict]) -> dict:
    """`learner/KEY` for KEY in MEAN_KEYS (mean over ranks), the extremes over ranks (ratio_min,
    ratio_max, grad_norm_max, first_ratio_max_abs_dev, seconds: the slowest rank), and rank 0's step
    counts. Empty when no rank reported."""
    if not per_rank:
        return {}
    rec: dict = {}
    for key in MEAN_KEYS:
        values = [m[key] for m in per_rank if key in m]
        if values:
            rec[f"learner/{key}"] = float(np.nanmean(values))
    rec["learner/ratio_min"] = min(m["ratio_min"] for m in per_rank)
    rec["learner/ratio_max"] = max(m["ratio_max"] for m in per_rank)
    rec["learner/grad_norm_max"] = max(m["grad_norm_max"] for m in per_rank)
    rec["learner/first_ratio_max_abs_dev"] = max(m["first_ratio_max_abs_dev"] for m in per_rank)
    rec["learner/optimizer_steps"] = per_rank[0]["optimizer_steps"]
    rec["learner/micro_steps"] = per_rank[0]["micro_steps"]  # minibatches x sampled steps, per worker
    rec["learner/seconds"] = max(m["seconds"] for m in per_rank)
    return rec
