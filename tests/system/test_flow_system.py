"""Flow-matching models through the whole Ray system (samplers, reward actors, DeepSpeed learner) on
a local Ray: LOOP on a tiny SD3 (LoRA, Flow-GRPO's SDE) and a tiny FLUX (full transformer, Flow-CPS,
a random stochastic window with branching groups). Each writes its metrics and a checkpoint whose
transformer loads into the diffusers pipeline; the SD3 run resumes exactly."""

import json

import pytest
import torch

from loop_ray.cli.train import main
from loop_ray.config import load_config
from loop_ray.system.roles.learner import state_digest
from loop_ray.system.run.driver import train

pytestmark = pytest.mark.slow

SMALL = {"eval.max_prompts": 1, "eval.images_per_prompt": 1, "logging.tensorboard": False,
         "model.max_sequence_length": 8, "checkpoint.keep_last": 3}
SD3 = {**SMALL, "model.kind": "tiny_sd3", "model.lora_rank": 4, "sampling.guidance_scale": 4.5,
       "sampling.flow_noise_level": 0.7}
FLUX = {**SMALL, "model.kind": "tiny_flux", "sampling.guidance_scale": 3.5, "sampling.flow_sde": "cps",
        "sampling.flow_noise_level": 0.8, "sampling.sde_window": 2, "sampling.sde_window_placement": "random",
        "sampling.sde_window_end": 3, "sampling.group_noise": "branch", "algorithm.skip_first_steps": 0}
COMPARED = ("iteration", "version", "images_seen", "train/reward_mean", "learner/loss", "learner/approx_kl",
            "learner/ratio_min", "learner/grad_norm")


def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _checkpoint(run_dir, iteration):
    return run_dir / "checkpoints" / f"iter-{iteration:06d}"


def _pipeline_with(cfg, transformer_folder):
    """The diffusers pipeline of the run's tiny stack with the checkpoint's transformer, loaded by
    diffusers alone (a real model: `Pipeline.from_pretrained(model.path, transformer=...)`)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from loop_ray.diffusion.flow.models import pipeline_class, tiny_flux_components, tiny_sd3_components

    components = (tiny_sd3_components if cfg.model.kind == "tiny_sd3" else tiny_flux_components)(cfg.model.seed)
    cls = SD3Transformer2DModel if components.kind == "sd3" else FluxTransformer2DModel
    modules = {**components.pipeline_modules(), "transformer": cls.from_pretrained(transformer_folder)}
    pipe = pipeline_class(components.kind)(**modules)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_run(cfg, run_dir, iterations):
    records = _train_records(run_dir)
    assert [r["iteration"] for r in records] == list(range(iterations))
    for r in records:
        assert r["train/samples_learned"] == 8 and r["version"] == r["iteration"] + 1
        assert r["learner/first_ratio_max_abs_dev"] <= 1e-5  # sync: sampled by the weights it learns from
        assert r["learner/optimizer_steps"] > 0 and r["weights/bytes"] > 0
    ckpt = _checkpoint(run_dir, iterations)
    assert (ckpt / "transformer" / "config.json").is_file() and not (ckpt / "unet").exists()
    pipe = _pipeline_with(cfg, ckpt / "transformer")
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, max_sequence_length=8,
                 guidance_scale=cfg.sampling.guidance_scale, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3)
    # the saved transformer is the trained policy's network (LoRA merged), equal to trainable.pt's weights
    from loop_ray.diffusion.ddim.stable_diffusion import plain_unet
    from loop_ray.diffusion.factory import build_policy

    policy = build_policy(cfg)
    policy.load_trainable_state_dict(torch.load(ckpt / "trainable.pt"))
    trained, saved = plain_unet(policy.transformer).state_dict(), pipe.transformer.state_dict()
    assert trained.keys() == saved.keys()
    for k in trained:
        torch.testing.assert_close(saved[k], trained[k], rtol=1e-6, atol=1e-6)
    base = build_policy(cfg).transformer.state_dict()
    assert any(not torch.allclose(saved[k], base[k.replace(".weight", ".base_layer.weight")]
                                  if k.replace(".weight", ".base_layer.weight") in base else base[k]) for k in saved)
    return records


def test_tiny_sd3_loop_run_checkpoint_loads_into_the_pipeline_and_resumes(ray_session, tmp_path):
    straight_cfg = load_config("configs/debug.yaml", {**SD3, "output_dir": str(tmp_path / "straight"),
                                                      "iterations": 2, "checkpoint.every": 1})
    straight = train(straight_cfg)
    records = _check_run(straight_cfg, straight.run_dir, 2)
    assert all(r["learner/optimizer_steps"] == 4 for r in records)  # 2 epochs x 2 minibatches

    first = train(load_config("configs/debug.yaml", {**SD3, "output_dir": str(tmp_path / "resumed"), "iterations": 1}))
    assert main(["--resume", str(first.run_dir), "--iterations", "2"]) == 0
    digest = [state_digest(torch.load(_checkpoint(run, 2) / "trainable.pt")) for run in (first.run_dir, straight.run_dir)]
    assert digest[0] == digest[1]
    assert [{k: r.get(k) for k in COMPARED} for r in _train_records(first.run_dir)] == [
        {k: r.get(k) for k in COMPARED} for r in records]


def test_tiny_flux_with_a_cps_window_and_branching_groups(ray_session, tmp_path):
    cfg = load_config("configs/debug.yaml", {**FLUX, "output_dir": str(tmp_path), "iterations": 2})
    run = train(cfg).run_dir
    _check_run(cfg, run, 2)
    ckpt_cfg = load_config(run / "config.yaml")
    assert ckpt_cfg.sampling.sde_window == 2 and ckpt_cfg.model.kind == "tiny_flux"
