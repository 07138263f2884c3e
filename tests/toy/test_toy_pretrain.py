"""`loop-ray pretrain-toy`: a few steps of a tiny model, determinism, and the schedule pieces."""

import json

import torch

from loop_ray.cli.main import main as cli_main
from loop_ray.toy.model import load_toy_components
from loop_ray.toy.pretrain import PromptSampler, lr_factor, min_snr_weights, sample_timesteps

ARGS = ["--tiny", "--steps", "4", "--batch-size", "4", "--warmup", "2", "--no-progress"]


def test_smoke_and_determinism(tmp_path):
    assert cli_main(["pretrain-toy", "--out", str(tmp_path / "a"), *ARGS]) == 0
    log = json.loads((tmp_path / "a" / "pretrain_log.json").read_text())
    assert torch.isfinite(torch.tensor(log["loss_every_50"])).all() and log["torch_threads"] == 1
    a = load_toy_components(tmp_path / "a")
    cli_main(["pretrain-toy", "--out", str(tmp_path / "b"), *ARGS])
    b = load_toy_components(tmp_path / "b")
    for pa, pb in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    cli_main(["pretrain-toy", "--out", str(tmp_path / "c"), "--seed", "1", *ARGS])
    c = load_toy_components(tmp_path / "c")
    assert not torch.allclose(next(a.unet.parameters()), next(c.unet.parameters()))


def test_schedule_pieces():
    assert lr_factor(0, 10, 100) == 0.1 and lr_factor(9, 10, 100) == 1.0
    assert abs(lr_factor(100, 10, 100)) < 1e-12
    abar = torch.linspace(0.999, 0.001, 1000)
    w = min_snr_weights(abar, torch.tensor([0, 999]), 5.0)
    assert w[0] < 1.0 and w[1] == 1.0  # high SNR down-weighted, low SNR untouched
    t = sample_timesteps(torch.Generator().manual_seed(0), 4000, 1000)
    focus = ((t >= 400) & (t <= 850)).float().mean()
    assert 0.65 < focus < 0.8  # half focused + 45 % of the uniform half


def test_prompt_sampler_is_fixed_by_seed_and_step():
    s = PromptSampler(seed=0, cfg_dropout=0.5)
    assert s.batch(3, 8) == PromptSampler(seed=0, cfg_dropout=0.5).batch(3, 8)
    assert s.batch(3, 8) != s.batch(4, 8)
    prompts, cond, _ = s.batch(0, 200)
    assert 60 < sum(c == "" for c in cond) < 140 and all(c in ("", p) for p, c in zip(prompts, cond))
