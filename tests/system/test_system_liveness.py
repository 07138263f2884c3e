"""Faults under load in asynchronous mode (max_staleness 1), where the next iteration's calls are
already queued on an actor when a call of the current one fails: the failed call is sent again
and loads exactly the weights it was planned with (version 0 included), and an actor that is
alive but busy is never taken for a lost one. Each run must equal an unbroken run."""

import json

import pytest
from faulty_actors import flaky_reward_actor, flaky_sampler

from loop_ray.config import load_config
from loop_ray.prompts import load_prompts
from loop_ray.system.launch import launch
from loop_ray.system.launch.launch import System
from loop_ray.system.run.driver import Trainer
from loop_ray.system.run.run_dir import RunDir

pytestmark = pytest.mark.slow


def _run(cfg, ping_timeout=None):
    system = System.start(cfg)
    if ping_timeout is not None:
        system.samplers.ping_timeout = system.reward_pool.actors.ping_timeout = ping_timeout
    run = RunDir.create(cfg)
    try:
        trainer = Trainer(cfg, system, run, load_prompts(cfg.prompts.train), load_prompts(cfg.prompts.val))
        trainer.train()
        digest = system.learner.digests()[0]
        replaced = system.samplers.replaced + system.reward_pool.replaced
    finally:
        run.close()
        system.shutdown()
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    return digest, [r for r in records if r["kind"] == "train"], replaced


@pytest.fixture(scope="module")
def async_cfg_and_baseline(ray_session, tmp_path_factory):
    cfg = load_config("configs/debug.yaml", {
        "output_dir": str(tmp_path_factory.mktemp("liveness")), "iterations": 3, "cluster.mode": "async",
        "cluster.max_staleness": 1, "eval.max_prompts": 1, "eval.images_per_prompt": 1,
        "logging.tensorboard": False,
    })
    return cfg, _run(cfg)


def _same_run(result, baseline):
    digest, records, replaced = result
    base_digest, base_records, _ = baseline
    assert [r["train/samples_learned"] for r in records] == [8, 8, 8]
    assert [r["train/failed_calls"] for r in records] == [0, 0, 0]
    for r, b in zip(records, base_records, strict=True):
        for key in ("train/reward_mean", "learner/loss", "staleness/mean", "version"):
            assert r[key] == b[key], key
    assert digest == base_digest
    assert replaced == 0  # the actor stayed alive: it is used again, never replaced


def test_async_resend_of_a_version_0_call_loads_the_planned_weights(async_cfg_and_baseline, monkeypatch):
    """Iteration 1 was planned with version 0; its sampler call fails once the sampler has
    already loaded version 1 for iteration 2: the resend loads version 0 again."""
    cfg, baseline = async_cfg_and_baseline
    monkeypatch.setattr(launch, "RemoteSampler", flaky_sampler(fail_on=2))
    result = _run(cfg)
    _same_run(result, baseline)
    assert sum(r["faults/sampler_jobs_regenerated"] for r in result[1]) >= 1


@pytest.mark.parametrize("role", ["sampler", "reward"])
def test_busy_actor_is_not_taken_for_lost(async_cfg_and_baseline, monkeypatch, role):
    """Every work call sleeps longer than the ping timeout, so a failed call's actor is busy with
    the next iteration when the driver checks it: it answers all the same and is not replaced."""
    cfg, baseline = async_cfg_and_baseline
    slow, ping_timeout = 1.5, 0.5
    monkeypatch.setattr(launch, "RemoteSampler", flaky_sampler(fail_on=2 if role == "sampler" else 0, sleep_s=slow))
    monkeypatch.setattr(launch, "RemoteRewardActor", flaky_reward_actor(fail_on=3 if role == "reward" else 0,
                                                                       sleep_s=slow))
    result = _run(cfg, ping_timeout=ping_timeout)
    _same_run(result, baseline)
    redone = "faults/sampler_jobs_regenerated" if role == "sampler" else "faults/reward_calls_repeated"
    assert sum(r[redone] for r in result[1]) >= 1
