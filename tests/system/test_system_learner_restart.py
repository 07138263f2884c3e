"""A learner rank lost mid-run (ray.kill, as a pre-empted node or Ray's memory monitor would):
the driver stops the group at the rank's first error, rebuilds it, restores it from the newest
good checkpoint and goes on. The run ends with the weights of a run resumed by hand from that
checkpoint (synchronous mode: bit-identical)."""

import json

import pytest
import ray
import torch

from loop_ray.config import load_config
from loop_ray.prompts import load_prompts
from loop_ray.system.launch.launch import System
from loop_ray.system.roles.learner import state_digest
from loop_ray.system.run.driver import Trainer, train
from loop_ray.system.run.resume import ResumePoint
from loop_ray.system.run.run_dir import RunDir
from loop_ray.training.checkpoint import verify_checkpoint

pytestmark = pytest.mark.slow


class LearnerKillingTrainer(Trainer):
    """Kills learner rank 1 right after iteration `at`'s calls were sent."""

    at, killed = 2, False

    def dispatch(self, iteration: int):
        rollout = super().dispatch(iteration)
        if iteration == self.at and not self.killed:
            self.killed = True
            ray.kill(self.system.learner.workers[1], no_restart=True)
        return rollout


def _digest(run_dir, iteration):
    return state_digest(torch.load(run_dir / "checkpoints" / f"iter-{iteration:06d}" / "trainable.pt"))


def test_lost_learner_rank_is_rebuilt_from_the_newest_checkpoint(ray_session, tmp_path):
    cfg = load_config("configs/debug.yaml", {
        "output_dir": str(tmp_path), "iterations": 3, "checkpoint.every": 1, "checkpoint.keep_last": 3,
        "learner.num_workers": 2, "learner.num_cpus_per_worker": 0.25, "learner.minibatch_size": 2,
        "eval.max_prompts": 1, "eval.images_per_prompt": 1, "logging.tensorboard": False,
    })
    system = System.start(cfg)
    run = RunDir.create(cfg)
    try:
        trainer = LearnerKillingTrainer(cfg, system, run, load_prompts(cfg.prompts.train),
                                        load_prompts(cfg.prompts.val))
        trainer.train()
    finally:
        run.close()
        system.shutdown()
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train_records] == [0, 1, 2]  # iteration 2 logged once, after the restart
    assert train_records[-1]["faults/learner_restarts"] == 1
    assert [r["train/samples_learned"] for r in train_records] == [8, 8, 8]
    restarted = _digest(run.path, 3)

    # by hand: resume the same run folder from the checkpoint the restart used (iteration 2)
    folder = run.path / "checkpoints" / "iter-000002"
    point = ResumePoint(run.path, folder, verify_checkpoint(folder))
    train(cfg, resume=point)
    assert _digest(run.path, 3) == restarted
