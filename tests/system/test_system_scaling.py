"""Independent scaling on a real local Ray (CPU): 2 samplers, 2 reward actors and 2 learner workers
(one torch.distributed group over gloo, ZeRO stage 2) with fractional CPUs on a 2-CPU Ray."""

import json

import pytest

from loop_ray.config import load_config
from loop_ray.system.run.driver import train

pytestmark = pytest.mark.slow


def test_two_of_each_role_all_work_and_the_learner_ranks_stay_in_sync(ray_session, tmp_path):
    cfg = load_config("configs/debug.yaml", {
        "output_dir": str(tmp_path), "iterations": 2,
        "cluster.num_samplers": 2, "cluster.sampler_cpus": 0.25,
        "cluster.num_reward_workers": 2, "cluster.reward_cpus": 0.25,
        "learner.num_workers": 2, "learner.num_cpus_per_worker": 0.5, "learner.zero_stage": 2,
        "eval.max_prompts": 2, "eval.images_per_prompt": 2,
    })
    run = train(cfg).run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == 2
    for r in steps:
        assert r["work/sampler_images"] == [4, 4]  # one prompt x K=4 each
        assert r["work/reward_images"] == [4, 4]
        assert r["work/learner_samples"] == [4, 4]  # one data-parallel shard each
        assert r["learner/weights_in_sync"] is True
        assert len(r["learner/weights_digests"]) == 2
    # the ranks agree after every step, and the steps changed the weights
    assert steps[0]["learner/weights_digests"][0] != steps[1]["learner/weights_digests"][0]
