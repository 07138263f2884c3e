"""The forward-process presets (`nft`, `rwr`) through the single-process loop on a tiny DDIM stack
and a tiny SD3 flow stack: clean-only records from deterministic sampling with the old policy,
updates that move theta, and the old policy's EMA after each iteration."""

import pytest
import torch

from loop_ray.config import load_config
from loop_ray.forward_process import old_policy_decay
from loop_ray.training.single_process import SingleProcessRun

torch.set_num_threads(1)

KINDS = {
    "tiny_sd": {},
    "tiny_sd3": {"model.kind": "tiny_sd3", "model.max_sequence_length": 8, "model.lora_rank": 4,
                 "sampling.guidance_scale": 1.0},
}


def _cfg(kind, preset, **extra):
    return load_config("configs/debug.yaml", {
        **KINDS[kind], "algorithm.preset": preset, "sampling.eta": 0.0, "eval.max_prompts": 1,
        "eval.images_per_prompt": 1, "algorithm.nft_decay_rate": 0.1, **extra,
    })


@pytest.mark.parametrize("kind", ["tiny_sd", "tiny_sd3"])
def test_nft_samples_with_the_old_policy_and_moves_it_by_its_ema(kind):
    cfg = _cfg(kind, "nft")
    assert (cfg.algorithm.objective, cfg.algorithm.advantage, cfg.algorithm.importance_sampling) == (
        "nft", "batch_std", False)
    run = SingleProcessRun(cfg)
    start = run.policy.trainable_state_dict()
    batch, rejected = run.sample_and_score(0)
    assert rejected == 0 and batch.latents.shape[1] == 1 and batch.log_probs.shape == (len(batch), 0)
    assert not torch.equal(batch.latents[0], batch.latents[1])  # a group's samples differ (own noise)
    again, _ = run.sample_and_score(0)
    assert torch.equal(again.latents, batch.latents)  # deterministic sampling: the same seeds, the same x_0
    metrics = run.learn(batch, 0)
    steps = metrics["optimizer_steps"]
    assert steps > 0 and torch.isfinite(torch.tensor(metrics["loss"]))
    eta = old_policy_decay(steps, 0.1, cfg.algorithm.nft_decay_max)
    assert metrics["old_decay"] == eta and run.old.optimizer_steps == steps
    theta = run.policy.trainable_state_dict()
    assert any(not torch.equal(theta[k], start[k]) for k in theta)
    old = run.old.publishable()
    for k in theta:  # theta_old = eta theta_old + (1 - eta) theta, theta_old starting at the initial weights
        torch.testing.assert_close(old[k], eta * start[k] + (1 - eta) * theta[k], rtol=1e-5, atol=1e-6)
    # the next iteration samples with theta_old, not theta
    from loop_ray.diffusion.factory import build_policy

    sampler = build_policy(cfg)
    sampler.load_trainable_state_dict(old)
    plan_batch, _ = run.sample_and_score(1)
    ref = sampler.sample(plan_batch.prompts[:: cfg.sampling.k], cfg.sampling.k, plan_batch.seeds, clean_only=True)
    torch.testing.assert_close(plan_batch.latents, ref.latents, rtol=0, atol=1e-5)
    assert all(torch.equal(v, theta[k]) for k, v in run.policy.trainable_state_dict().items())  # theta restored


@pytest.mark.parametrize("kind", ["tiny_sd", "tiny_sd3"])
def test_rwr_trains_the_weighted_denoising_loss(kind):
    cfg = _cfg(kind, "rwr", **{"algorithm.control": "shuffle"})
    run = SingleProcessRun(cfg)
    assert run.old is None
    start = run.policy.trainable_state_dict()
    record = run.step(0)
    assert record["learner/optimizer_steps"] > 0 and record["learner/r_mean"] > 0
    theta = run.policy.trainable_state_dict()
    assert any(not torch.equal(theta[k], start[k]) for k in theta)


def test_study_runs_nft_and_rwr_and_evaluates_the_pretrained_model_with_their_sampler(tmp_path):
    import json

    from loop_ray.cli.study import main

    out = tmp_path / "study"
    assert main(["--quick", "--config", "configs/debug.yaml", "--out", str(out), "--methods", "nft", "rwr",
                 "loop_k4"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert [(r["label"], r["objective"]) for r in report["runs"]] == [
        ("nft", "nft"), ("rwr", "rwr"), ("loop_k4", "policy_gradient")]
    befores = [json.dumps(r["before"], sort_keys=True) for r in report["runs"]]
    assert befores[0] == befores[1] != befores[2]  # eta 0 for nft and rwr, the config's eta 1 for LOOP
    table = (out / "table.md").read_text()
    assert "| pre-trained, sampled as nft, rwr |" in table and "| pre-trained, sampled as loop_k4 |" in table
