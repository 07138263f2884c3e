"""configs/flow/*_nft.yaml: DiffusionNFT on SD3.5-M and FLUX.1-dev with the authors' published
settings, as `loop-ray config show` resolves them (no weights needed)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loop_ray.config import load_config
from loop_ray.system.run.validate import validate_inputs

REPO = Path(__file__).resolve().parents[2]
NFT_CONFIGS = sorted((REPO / "configs" / "flow").glob("*_nft.yaml"))


def test_both_flow_models_have_an_nft_config():
    assert {p.stem for p in NFT_CONFIGS} == {"sd35m_clipscore_nft", "flux1dev_clipscore_nft"}


@pytest.mark.parametrize("path", NFT_CONFIGS, ids=lambda p: p.stem)
def test_config_show_resolves_the_authors_settings(path):
    out = subprocess.run([sys.executable, "-m", "loop_ray.cli", "config", "show", str(path)], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    shown = yaml.safe_load(out)
    a, s, learner = shown["algorithm"], shown["sampling"], shown["learner"]
    assert (a["preset"], a["objective"], a["advantage"], a["importance_sampling"]) == (
        "nft", "nft", "batch_std", False)
    assert (a["nft_beta"], a["nft_decay_rate"], a["nft_decay_max"], a["nft_decay_flat"]) == (1.0, 0.001, 0.5, 0)
    assert (a["kl_beta"], a["adv_clip_max"], a["std_eps"], a["nft_adaptive_weight"]) == (1e-4, 5.0, 1e-4, True)
    assert (s["k"], s["prompts_per_iteration"], s["flow_noise_level"], s["group_noise"], s["flow_resolution"]) == (
        24, 48, 0.0, "independent", 512)
    assert (learner["lr"], learner["weight_decay"], learner["max_grad_norm"], learner["adam_eps"]) == (
        3e-4, 1e-4, 1.0, 1e-8)
    # 1,152 samples over 8 workers = 16 minibatches of 9 per worker, one optimizer step per iteration
    assert learner["num_workers"] * learner["minibatch_size"] * learner["minibatches_per_step"] == 24 * 48
    cfg = load_config(path)
    validate_inputs(cfg)
    from loop_ray.training.update import train_steps_per_sample

    if path.stem.startswith("sd35m"):
        assert (s["num_steps"], s["guidance_scale"], shown["model"]["lora_rank"]) == (10, 1.0, 32)
        assert train_steps_per_sample(cfg, 10) == 9  # the authors' timestep_fraction 0.99 of 10 steps
    else:
        assert (s["num_steps"], s["guidance_scale"], shown["model"]["lora_rank"]) == (6, 3.5, 64)
        assert train_steps_per_sample(cfg, 6) == 5
