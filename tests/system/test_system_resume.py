"""Exact resume on a real local Ray with DeepSpeed: 4 iterations straight give the same weights
and the same metrics as 2 iterations, a stop, and `loop-ray train --resume RUN_DIR` for 2 more.
The checkpoint's UNet loads with diffusers alone."""

import json

import pytest
import torch

from loop_ray.cli.train import main
from loop_ray.config import load_config
from loop_ray.system.roles.learner import state_digest
from loop_ray.system.run.driver import train

pytestmark = pytest.mark.slow

COMPARED = ("iteration", "version", "images_seen", "train/reward_mean", "train/advantage_abs_mean", "learner/loss",
            "learner/approx_kl", "learner/ratio_min", "learner/grad_norm")


def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: r.get(k) for k in COMPARED} for r in map(json.loads, lines) if r["kind"] == "train"]


def _final_digest(run_dir, iteration):
    return state_digest(torch.load(run_dir / "checkpoints" / f"iter-{iteration:06d}" / "trainable.pt"))


def test_four_iterations_equal_two_then_resume_two(ray_session, tmp_path):
    common = {"eval.max_prompts": 1, "eval.images_per_prompt": 1, "logging.tensorboard": True,
              "checkpoint.keep_last": 3}
    straight = train(load_config("configs/debug.yaml", {
        **common, "output_dir": str(tmp_path / "straight"), "iterations": 4, "checkpoint.every": 2}))
    first = train(load_config("configs/debug.yaml", {
        **common, "output_dir": str(tmp_path / "resumed"), "iterations": 2}))
    # the resumed run: the run folder's own config.yaml, extended to 4 iterations
    assert main(["--resume", str(first.run_dir), "--iterations", "4"]) == 0

    assert _final_digest(first.run_dir, 4) == _final_digest(straight.run_dir, 4)
    assert _train_records(first.run_dir) == _train_records(straight.run_dir)
    labels = [json.loads(line)["label"] for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"kind": "eval"' in line]
    assert labels == ["before", "after", "after"]  # the stop's evaluation stays in the log

    # the UNet of the checkpoint, in diffusers format, is the trained one
    from diffusers import UNet2DConditionModel

    ckpt = first.run_dir / "checkpoints" / "iter-000004"
    unet = UNet2DConditionModel.from_pretrained(ckpt / "unet")
    trained = torch.load(ckpt / "trainable.pt")
    plain = unet.state_dict()
    assert all(torch.equal(plain[k], v) for k, v in trained.items())


def test_resume_of_a_finished_run_with_nothing_left_to_do(ray_session, tmp_path):
    run = train(load_config("configs/debug.yaml", {
        "output_dir": str(tmp_path), "iterations": 1, "eval.max_prompts": 1, "eval.images_per_prompt": 1}))
    assert main(["--resume", str(run.run_dir)]) == 0
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [0]


def test_resume_without_a_usable_checkpoint_fails_naming_the_folder(tmp_path, capsys):
    run = tmp_path / "debug-1"
    (run / "checkpoints").mkdir(parents=True)
    assert main(["--resume", str(run), "--set", "learner.lr=1"]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and str(run) in err
