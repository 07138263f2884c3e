"""Actor faults on a real local Ray: a sampler or a reward actor is killed while an iteration is in
flight. The lost work is done again with the same seeds and images, so the run learns from exactly
the planned groups and ends with the very weights of a run without the fault."""

import json

import pytest
import ray

from loop_ray.config import load_config
from loop_ray.prompts import load_prompts
from loop_ray.system.launch.launch import System
from loop_ray.system.run.driver import Trainer
from loop_ray.system.run.run_dir import RunDir

pytestmark = pytest.mark.slow


class KillingTrainer(Trainer):
    """Kills an actor right after iteration `at`'s calls were sent, i.e. with work in flight."""

    def __init__(self, *args, kill: str | None = None, at: int = 1, restart: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill, self.at, self.restart = kill, at, restart

    def dispatch(self, iteration: int):
        rollout = super().dispatch(iteration)
        if self.kill and iteration == self.at:
            actors = self.system.samplers if self.kill == "sampler" else self.system.reward_pool.actors
            ray.kill(actors[0], no_restart=not self.restart)
        return rollout


def _run(cfg, **kill):
    system = System.start(cfg)
    run = RunDir.create(cfg)
    try:
        train_set, val_set = load_prompts(cfg.prompts.train), load_prompts(cfg.prompts.val)
        trainer = KillingTrainer(cfg, system, run, train_set, val_set, **kill)
        trainer.train()
        digest = system.learner.digests()[0]
        replaced = system.samplers.replaced + system.reward_pool.actors.replaced
    finally:
        run.close()
        system.shutdown()
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    return digest, [r for r in records if r["kind"] == "train"], replaced


@pytest.fixture(scope="module")
def cfg_and_baseline(ray_session, tmp_path_factory):
    cfg = load_config("configs/debug.yaml", {
        "output_dir": str(tmp_path_factory.mktemp("faults")), "iterations": 2, "cluster.max_restarts": 1,
        "eval.max_prompts": 1, "eval.images_per_prompt": 1, "logging.tensorboard": False,
    })
    return cfg, _run(cfg)


def _same_run(result, baseline):
    digest, records, _ = result
    base_digest, base_records, _ = baseline
    assert [r["train/groups_learned"] for r in records] == [2, 2]  # the plan: 2 prompts x K=4 per iteration
    assert [r["train/samples_learned"] for r in records] == [8, 8]
    for r, b in zip(records, base_records):
        assert r["train/reward_mean"] == b["train/reward_mean"]  # the same images, scored the same
        assert r["learner/loss"] == b["learner/loss"]
    assert digest == base_digest  # the very same weights at the end


@pytest.mark.parametrize("kill, redone", [("sampler", "faults/sampler_jobs_regenerated"),
                                           ("reward", "faults/reward_calls_repeated")])
def test_actor_lost_for_good_is_replaced_and_its_work_redone(cfg_and_baseline, kill, redone):
    """The sampler's batch is sampled again with the same seeds; the reward actor's images are
    scored again: by a fresh actor started in place of the killed one."""
    cfg, baseline = cfg_and_baseline
    result = _run(cfg, kill=kill, restart=False)
    _same_run(result, baseline)
    _, records, replaced = result
    assert replaced == 1
    assert records[1][redone] >= 1 and records[1]["train/failed_calls"] == 0


def test_crashed_sampler_is_restarted_by_ray_and_its_call_retried(cfg_and_baseline):
    cfg, baseline = cfg_and_baseline
    result = _run(cfg, kill="sampler", restart=True)  # a crash: Ray restarts it (max_restarts=1)
    _same_run(result, baseline)
    assert result[2] == 0  # nothing had to be replaced
