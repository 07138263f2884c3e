"""End to end on a real local Ray with DeepSpeed on the CPU: the tiny_sd model, a few DDIM steps,
a tiny batch. Every role runs; the run folder gets its config, metrics, plot, grids, checkpoint."""

import json
import math
import time

import pytest
import yaml

from loop_ray.cli.train import main
from loop_ray.config import ConfigError, load_config
from loop_ray.system.run.driver import train

pytestmark = pytest.mark.slow


def _records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_short_run_writes_every_output(ray_session, tmp_path):
    cfg = load_config("configs/debug.yaml", {
        "output_dir": str(tmp_path), "iterations": 2, "checkpoint.every": 1, "checkpoint.keep_last": 1,
        "eval.every": 1,
    })
    result = train(cfg)
    run = result.run_dir
    assert run.parent == tmp_path and run.name.startswith("debug-")
    assert load_config(run / "config.yaml") == cfg

    train_records = _records(run, "train")
    assert [r["iteration"] for r in train_records] == [0, 1]
    for r in train_records:
        assert r["work/sampler_images"] == [8] and r["work/reward_images"] == [8] and r["work/learner_samples"] == [8]
        assert r["train/samples_learned"] == 8 and r["learner/optimizer_steps"] == 4  # 2 epochs x 2 minibatches
        assert r["learner/first_ratio_max_abs_dev"] <= 1e-5  # synchronous: sampled by the weights it learns from
        assert r["weights/bytes"] > 0 and r["version"] == r["iteration"] + 1
    assert train_records[-1]["images_seen"] == 16

    evals = _records(run, "eval")
    # the sampler loaded version 1 for the evaluation after iteration 0, and version 2 for the last
    assert evals[1]["weights/sampler_load_seconds"] > 0 and evals[2]["weights/sampler_load_seconds"] > 0
    assert [e["label"] for e in evals] == ["before", "iter-000001", "after"]
    assert all(e["eval/images"] == 8 and "eval/reward/color" in e for e in evals)
    assert result.after.by_category.keys() == result.before.by_category.keys() == {"color"}
    for label in ("before", "iter-000001", "after"):
        assert (run / "eval" / f"{label}.png").stat().st_size > 0

    assert (run / "reward.png").stat().st_size > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["frozen", "iter-000002"]  # keep_last=1 pruned iter-000001; no temp folder left
    ckpt = run / "checkpoints" / "iter-000002"
    state = json.loads((ckpt / "driver_state.json").read_text())
    assert state["iteration"] == 2 and state["version"] == 2 and state["images_seen"] == 16
    assert (ckpt / "trainable.pt").stat().st_size > 0
    assert (ckpt / "deepspeed" / "iter-000002" / "mp_rank_00_model_states.pt").is_file()
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["name"] == "debug"


def test_async_mode_learns_from_samples_one_version_old(ray_session, tmp_path):
    cfg = load_config("configs/debug.yaml", {
        "output_dir": str(tmp_path), "iterations": 3, "cluster.mode": "async", "cluster.max_staleness": 1,
        "eval.max_prompts": 2, "eval.images_per_prompt": 1,
    })
    records = _records(train(cfg).run_dir, "train")
    assert [r["staleness/mean"] for r in records] == [0.0, 1.0, 1.0]
    assert [r["train/samples_learned"] for r in records] == [8, 8, 8]
    assert records[0]["learner/first_ratio_max_abs_dev"] <= 1e-5
    assert records[2]["learner/first_ratio_max_abs_dev"] > 1e-5  # off-policy: the ratio starts away from 1
    assert [r["staleness/counts"] for r in records] == [[8], [0, 8], [0, 8]]  # histogram over versions
    assert all(0.0 <= r["idle/sampler_fraction"] <= 1.0 and 0.0 <= r["idle/learner_fraction"] <= 1.0
               for r in records)


def test_async_mode_with_a_sliding_window_branching_the_shuffle_control_and_a_kl_penalty(ray_session, tmp_path):
    """The lower-noise sampling designs, the KL penalty and the null control go through the whole
    system: samplers sample the iteration's window with branched groups, the buffer shuffles the
    advantages, the learner trains on the window only, one version behind, pulled towards the
    weights it started from."""
    cfg = load_config("configs/debug.yaml", {
        "output_dir": str(tmp_path), "iterations": 3, "cluster.mode": "async", "cluster.max_staleness": 1,
        "eval.max_prompts": 2, "eval.images_per_prompt": 1, "sampling.sde_window": 2,
        "sampling.sde_window_placement": "sliding", "sampling.group_noise": "branch",
        "algorithm.control": "shuffle", "algorithm.skip_first_steps": 0, "algorithm.timestep_fraction": 1.0,
        "algorithm.kl_beta": 0.1,
    })
    records = _records(train(cfg).run_dir, "train")
    assert [r["staleness/mean"] for r in records] == [0.0, 1.0, 1.0]
    assert [r["train/samples_learned"] for r in records] == [8, 8, 8]
    assert records[0]["learner/first_ratio_max_abs_dev"] <= 1e-5
    # 2 epochs x 2 minibatches x the window's 2 steps, one optimizer step per minibatch
    assert all(r["learner/micro_steps"] == 8 and r["learner/optimizer_steps"] == 4 for r in records)
    # the weights move away from the reference, so the KL to it is positive (0 before the first step)
    assert all(r["learner/kl_ref"] > 0 for r in records)


def test_async_mode_with_staleness_zero_is_sync_mode(ray_session, tmp_path):
    def run(mode):
        cfg = load_config("configs/debug.yaml", {
            "output_dir": str(tmp_path / mode), "iterations": 2, "cluster.mode": mode, "cluster.max_staleness": 0,
            "eval.max_prompts": 1, "eval.images_per_prompt": 1, "logging.tensorboard": False,
        })
        keys = ("train/reward_mean", "learner/loss", "learner/grad_norm", "staleness/counts", "version")
        return [{k: r[k] for k in keys} for r in _records(train(cfg).run_dir, "train")]

    assert run("async") == run("sync")


@pytest.mark.parametrize(  # a missing prompt file and an unknown reward name: test_bad_input.py (the CLI)
    "override, message",
    [
        ("reward.terms.0.name=faulty_rewards:no_such_reward", "reward.terms.0.name"),
        ("learner.zero_stage=3", "learner.zero_stage"),
        ("sampling.k=3", "learner.minibatch_size"),
    ],
)
def test_bad_input_fails_before_any_actor_starts(override, message, capsys):
    assert main(["--config", "configs/debug.yaml", "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_cluster_without_room_names_the_resource_keys(ray_session, tmp_path):
    cfg = load_config("configs/debug.yaml", {"output_dir": str(tmp_path), "cluster.sampler_gpus": 1})
    with pytest.raises(ConfigError, match="cluster.sampler_gpus"):
        train(cfg)
    assert not list(tmp_path.iterdir())  # failed before the run folder was made


TINY = {"iterations": 2, "eval.max_prompts": 2, "eval.images_per_prompt": 1}


def test_invalid_rewards_reject_their_groups_and_the_run_goes_on(ray_session, tmp_path):
    """A user's reward, given by import path, returns NaN or inf for some prompts: those groups
    are counted and never learned from; evaluation leaves their images out of the mean."""
    from loop_ray.prompts import load_prompts
    from loop_ray.training.plan import plan_eval, plan_iteration

    cfg = load_config("configs/debug.yaml", {"output_dir": str(tmp_path), **TINY})
    train_set, val_set = load_prompts(cfg.prompts.train), load_prompts(cfg.prompts.val)
    plans = [plan_iteration(cfg, train_set, i).prompts for i in range(2)]
    nan_prompts, inf_prompts = [plans[0][0], plan_eval(cfg, val_set).prompts[0]], [plans[1][1]]
    cfg = load_config("configs/debug.yaml", {
        "output_dir": str(tmp_path), **TINY, "reward.terms.0.name": "faulty_rewards:PromptFaults",
        "reward.terms.0.kwargs": {"nan_prompts": nan_prompts, "inf_prompts": inf_prompts},
    })
    run = train(cfg).run_dir
    records = _records(run, "train")
    faulty = [sum(p in nan_prompts + inf_prompts for p in prompts) for prompts in plans]
    assert faulty == [1, 1]
    assert [r["train/rejected_groups"] for r in records] == faulty
    assert [r["train/rejected_images"] for r in records] == [4 * f for f in faulty]
    assert [r["train/samples_learned"] for r in records] == [4 * (2 - f) for f in faulty]  # only the rest
    assert [r["work/learner_samples"] for r in records] == [[4 * (2 - f)] for f in faulty]
    assert all(r["version"] == r["iteration"] + 1 for r in records)  # it learned on
    for e in _records(run, "eval"):
        assert e["eval/images"] == 2 and e["eval/rejected_images"] == 1  # the first val prompt's image
        assert math.isfinite(e["eval/reward_mean"])  # the mean of the other image, not NaN


def test_a_reward_always_of_the_wrong_shape_stops_the_run_with_a_clear_error(ray_session, tmp_path, capsys):
    code = main(["--config", "configs/debug.yaml", "--set", f"output_dir={tmp_path}", "--set", "iterations=2",
                 "--set", "eval.max_prompts=2", "--set", "eval.images_per_prompt=1",
                 "--set", "reward.terms.0.name=faulty_rewards:wrong_shape"])
    err = capsys.readouterr().err
    assert code == 1
    assert "iteration 0: all 2 groups were rejected for invalid rewards" in err
    assert "reward term 'faulty_rewards:wrong_shape' returned shape (9,) for 8 images" in err
    (run,) = tmp_path.iterdir()
    assert _records(run, "train") == [] and _records(run, "eval")[0]["eval/rejected_images"] == 2
    deadline = time.monotonic() + 30  # every actor was shut down: their CPUs are free again
    while ray_session.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0) == 2
