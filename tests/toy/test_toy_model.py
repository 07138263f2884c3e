"""The toy model: build, save and load in the diffusers layout; the committed checkpoint."""

import json

import pytest
import torch

from loop_ray.toy.model import (
    TINY_SPEC,
    build_toy_components,
    count_parameters,
    default_model_path,
    load_toy_components,
    save_toy_model,
)
from loop_ray.toy.tokenizer import tokenize


def _outputs(comps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = comps.unet.config.sample_size
    x = torch.randn(2, 3, size, size, generator=gen)
    ids = tokenize(comps.tokenizer, ["a red circle", "a blue square and a green triangle"])
    with torch.no_grad():
        emb = comps.text_encoder(ids)[0]
        return comps.unet(x, torch.tensor([951, 401]), encoder_hidden_states=emb).sample


def test_save_load_identical_outputs(tmp_path):
    comps = build_toy_components(TINY_SPEC, seed=3)
    comps.unet.eval()
    comps.text_encoder.eval()
    save_toy_model(comps, tmp_path / "m")
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "m" / part).is_dir()
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and "vae" not in index
    loaded = load_toy_components(tmp_path / "m")
    assert loaded.vae is None
    assert torch.equal(_outputs(comps), _outputs(loaded))
    assert loaded.scheduler.config.timestep_spacing == "leading"


def test_first_sampled_step_has_signal():
    comps = build_toy_components(TINY_SPEC)
    sched = comps.scheduler
    sched.set_timesteps(20)
    first = int(sched.timesteps[0])
    assert first == 951
    assert sched.alphas_cumprod[first] > 1e-3  # t=999 would give ~2e-9
    assert sched.config.set_alpha_to_one is False


def test_missing_parts_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_toy_components(tmp_path / "nope")
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        load_toy_components(tmp_path)


def test_committed_checkpoint_loads():
    folder = default_model_path()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 25 * 2**20
    comps = load_toy_components()
    assert comps.unet.config.sample_size == 24 and comps.unet.config.in_channels == 3
    assert 3.0e5 < count_parameters(comps.unet) < 1.0e6
    out = _outputs(comps)
    assert out.shape == (2, 3, 24, 24) and torch.isfinite(out).all()
