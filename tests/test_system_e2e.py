"""End to end on a real local Ray with DeepSpeed on the CPU: the tiny_sd model, a few DDIM steps,
a tiny batch. Every role runs; the run folder gets its config, metrics, plot, grids, checkpoint."""

import json

import pytest
import yaml

from loop_ray.config import ConfigError, load_config
from loop_ray.system.driver import main, train

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
    assert checkpoints == ["iter-000002"]  # keep_last=1 pruned iter-000001; no temp folder left
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


@pytest.mark.parametrize(
    "override, message",
    [
        ("prompts.train=/no/such/prompts.txt", "prompts.train"),
        ("reward.terms.0.name=no_such_reward", "reward.terms.0.name"),
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
