"""The forward-process presets through the whole Ray system (samplers with clean-only records,
reward actors, DeepSpeed learner holding DiffusionNFT's old policy): DiffusionNFT on a tiny DDIM
stack (full UNet) and a tiny SD3 flow stack (LoRA), each 2 iterations straight equal to 1, a stop
and `loop-ray train --resume` for 1 more (weights, old policy and metrics)."""

import json

import pytest
import torch

from loop_ray.cli.train import main
from loop_ray.config import load_config
from loop_ray.system.roles.learner import state_digest
from loop_ray.system.run.driver import train

pytestmark = pytest.mark.slow

SMALL = {"eval.max_prompts": 1, "eval.images_per_prompt": 1, "logging.tensorboard": False,
         "checkpoint.keep_last": 3, "algorithm.preset": "nft", "sampling.eta": 0.0,
         "algorithm.nft_decay_rate": 0.2}
KINDS = {
    "tiny_sd": SMALL,
    "tiny_sd3": {**SMALL, "model.kind": "tiny_sd3", "model.max_sequence_length": 8, "model.lora_rank": 4,
                 "sampling.guidance_scale": 1.0},
}
COMPARED = ("iteration", "version", "images_seen", "train/reward_mean", "learner/loss", "learner/grad_norm",
            "learner/old_decay")


def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _ckpt(run_dir, iteration):
    return run_dir / "checkpoints" / f"iter-{iteration:06d}"


@pytest.mark.parametrize("kind", ["tiny_sd", "tiny_sd3"])
def test_nft_through_ray_resumes_exactly(ray_session, tmp_path, kind):
    straight = train(load_config("configs/debug.yaml", {**KINDS[kind], "output_dir": str(tmp_path / "straight"),
                                                         "iterations": 2, "checkpoint.every": 1})).run_dir
    records = _train_records(straight)
    assert [r["iteration"] for r in records] == [0, 1]
    for r in records:
        assert r["train/samples_learned"] == 8 and r["learner/optimizer_steps"] > 0
        assert 0 < r["learner/old_decay"] <= 0.5 and r["weights/bytes"] > 0
    old = torch.load(_ckpt(straight, 2) / "old_policy.pt")
    theta = torch.load(_ckpt(straight, 2) / "trainable.pt")
    assert old["weights"].keys() == theta.keys() and old["optimizer_steps"] > 0
    assert any(not torch.equal(old["weights"][k], theta[k]) for k in theta)  # theta_old lags theta

    first = train(load_config("configs/debug.yaml", {**KINDS[kind], "output_dir": str(tmp_path / "resumed"),
                                                      "iterations": 1})).run_dir
    assert main(["--resume", str(first), "--iterations", "2"]) == 0
    resumed_old = torch.load(_ckpt(first, 2) / "old_policy.pt")
    assert state_digest(resumed_old["weights"]) == state_digest(old["weights"])
    assert resumed_old["optimizer_steps"] == old["optimizer_steps"]
    assert state_digest(torch.load(_ckpt(first, 2) / "trainable.pt")) == state_digest(theta)
    assert [{k: r.get(k) for k in COMPARED} for r in _train_records(first)] == [
        {k: r.get(k) for k in COMPARED} for r in records]
