"""One metrics schema: the single-process loop's train record uses the Ray driver's names
(loop_ray.system.run.metrics.iteration_record) for every figure both have."""

from types import SimpleNamespace

import numpy as np
import torch

from loop_ray.algorithms import StatTracker
from loop_ray.config import load_config
from loop_ray.system.roles.buffer import LearnBatch
from loop_ray.system.run.metrics import iteration_record
from loop_ray.training.single_process import SingleProcessRun

torch.set_num_threads(1)


def _driver_record(learner: list[dict]) -> dict:
    """The driver's record for one iteration of 8 samples, from stand-ins for its Ray-side inputs."""
    n = 8
    rollout = SimpleNamespace(rewards=np.linspace(0, 1, n), parts={}, sampler_stats=[], reward_stats=[],
                              failures=0, regenerated=0, rescored=0, rejected_images=0)
    batch = LearnBatch(refs=[None] * n, rows=np.arange(n), versions=np.zeros(n, np.int64), rewards=torch.zeros(n),
                       advantages=torch.zeros(n), group_ids=np.repeat(np.arange(2), 4))
    return iteration_record(0, 1, n, rollout, batch, learner, None, [], 0, 1.0)


def test_single_process_train_record_uses_the_driver_names():
    cfg = load_config("configs/debug.yaml", ["eval.max_prompts=1", "eval.images_per_prompt=1"])
    run = SingleProcessRun(cfg)
    record = run.step(0)
    learner = [{**run.learn(run.sample_and_score(1)[0], 1), "rank": 0}]  # one rank's update_on_shard figures
    driver = _driver_record(learner)
    assert set(record) <= set(driver), sorted(set(record) - set(driver))
    assert {k for k in record if k.startswith("learner/")} == {k for k in driver if k.startswith("learner/")}
    for key in ("train/reward_mean", "train/reward_std", "train/rejected_groups", "train/advantage_abs_mean",
                "images_seen", "iteration", "kind", "iteration_seconds", "throughput/images_per_s"):
        assert key in record
    assert record["kind"] == "train" and record["images_seen"] == cfg.sampling.k * cfg.sampling.prompts_per_iteration


def test_one_stat_tracker_factory():
    cfg = load_config("configs/debug.yaml", ["algorithm.preset=ppo"])
    tracker = StatTracker.for_algorithm(cfg.algorithm)
    a = cfg.algorithm
    assert (tracker.buffer_size, tracker.min_count, tracker.std_eps) == (a.stat_tracker_buffer,
                                                                        a.stat_tracker_min_count, a.std_eps)
    assert StatTracker.for_algorithm(load_config("configs/debug.yaml").algorithm) is None  # leave-one-out
    assert isinstance(SingleProcessRun(cfg).stat_tracker, StatTracker)
