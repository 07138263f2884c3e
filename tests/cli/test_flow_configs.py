"""configs/flow/: every file loads and validates without weights; bad flow settings are refused with
the key (or the model folder and its component) named, before any actor starts."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loop_ray.config import ConfigError, config_from_dict, load_config
from loop_ray.system.run.validate import validate_inputs

REPO = Path(__file__).resolve().parents[2]
# the policy-gradient configs; the forward-process ones (*_nft.yaml) have tests/cli/test_flow_nft_configs.py
FLOW_CONFIGS = sorted(p for p in (REPO / "configs" / "flow").glob("*.yaml") if not p.stem.endswith("_nft"))


def test_the_flow_folder_has_both_models_every_task_and_both_algorithms():
    names = {p.stem for p in FLOW_CONFIGS}
    assert names == {f"{m}_{t}_{a}" for m in ("sd35m", "flux1dev") for t in ("color", "shape", "aesthetic", "clipscore")
                     for a in ("loop", "ppo")}


@pytest.mark.parametrize("path", FLOW_CONFIGS, ids=lambda p: p.stem)
def test_every_flow_config_loads_and_validates_without_weights(path):
    cfg = load_config(path)
    validate_inputs(cfg)  # prompts, rewards, learner; the model id is not in this machine's cache
    assert cfg.name == path.stem and cfg.model.kind == ("sd3" if path.stem.startswith("sd35m") else "flux")
    assert cfg.model.lora_rank > 0 and cfg.sampling.flow_sde == "sde" and cfg.sampling.flow_resolution == 512
    assert cfg.algorithm.preset == path.stem.rsplit("_", 1)[1]
    assert (cfg.sampling.k, cfg.algorithm.advantage) == ((4, "leave_one_out") if cfg.algorithm.preset == "loop"
                                                         else (1, "stat_tracker"))
    if cfg.model.kind == "sd3":  # Flow-GRPO's SD3.5-M settings
        assert (cfg.sampling.num_steps, cfg.sampling.guidance_scale, cfg.sampling.flow_noise_level) == (10, 4.5, 0.7)
        assert (cfg.model.lora_rank, cfg.model.lora_alpha) == (32, 64)
    else:  # its FLUX.1-dev settings
        assert (cfg.sampling.num_steps, cfg.sampling.guidance_scale, cfg.sampling.flow_noise_level) == (6, 3.5, 0.9)
        assert (cfg.model.lora_rank, cfg.model.lora_alpha) == (64, 128)
    assert cfg.learner.lr == 3e-4 and cfg.algorithm.clip_eps == 1e-4 and cfg.algorithm.skip_last_steps == 1


def test_config_show_prints_a_flow_config_with_a_local_path():
    out = subprocess.run(
        [sys.executable, "-m", "loop_ray.cli", "config", "show", "configs/flow/sd35m_color_loop.yaml",
         "--set", "model.path=/models/sd3.5-medium"], cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    shown = yaml.safe_load(out)
    assert shown["model"]["path"] == "/models/sd3.5-medium" and shown["sampling"]["flow_noise_level"] == 0.7


@pytest.mark.parametrize(
    "data, key",
    [
        ({"model": {"kind": "sd3"}}, "model.path"),
        ({"model": {"kind": "flux"}}, "model.path"),
        ({"sampling": {"flow_sde": "cps", "flow_noise_level": 1.5}}, "sampling.flow_noise_level"),
        ({"sampling": {"flow_sde": "ode"}}, "sampling.flow_sde"),
        ({"sampling": {"flow_noise_level": -0.1}}, "sampling.flow_noise_level"),
        ({"model": {"kind": "tiny_flux"}, "sampling": {"num_steps": 6, "flow_sde": "cps", "sde_window": 2,
                                                        "sde_window_placement": "sliding"}}, "sde_window_end <= 5"),
        ({"model": {"kind": "tiny_sd3"}, "sampling": {"num_steps": 6, "flow_sde": "cps", "sde_steps": [1, 5]}},
         "sampling.sde_steps"),
    ],
)
def test_bad_flow_settings_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(data)


def test_a_cps_window_below_the_last_step_is_accepted():
    cfg = config_from_dict({"model": {"kind": "tiny_flux"}, "sampling": {
        "num_steps": 6, "flow_sde": "cps", "sde_window": 2, "sde_window_placement": "sliding", "sde_window_end": 5}})
    assert cfg.sampling.sde_window_end == 5
    config_from_dict({"model": {"kind": "tiny_sd3"}, "sampling": {"num_steps": 6, "flow_sde": "cps", "sde_window": 2}})


def test_a_local_folder_of_another_pipeline_is_refused_before_any_actor(tmp_path):
    from loop_ray.diffusion.flow.loading import save_flow_pipeline
    from loop_ray.diffusion.flow.models import tiny_flux_components

    folder = save_flow_pipeline(tiny_flux_components(), tmp_path / "flux")
    cfg = load_config(FLOW_CONFIGS[0], {"model.kind": "sd3", "model.path": str(folder)})
    with pytest.raises(ConfigError, match=r"model\.path: .*names the pipeline 'FluxPipeline'; model\.kind=sd3"):
        validate_inputs(cfg)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "_class_name": "EulerDiscreteScheduler"}))
    cfg = load_config(FLOW_CONFIGS[0], {"model.kind": "flux", "model.path": str(folder)})
    with pytest.raises(ConfigError, match="component scheduler is 'EulerDiscreteScheduler'"):
        validate_inputs(cfg)
    shutil.rmtree(folder / "vae")
    with pytest.raises(ConfigError, match=r"component folder vae/ is missing"):
        validate_inputs(cfg)


def test_the_cli_refuses_a_folder_it_cannot_drive_before_ray_starts(tmp_path):
    """`loop-ray train` on an SD3.5 config pointed at a FLUX folder: exit 2, the folder and the pipeline
    named, no Ray session and no run folder (the checks of tests/cli/test_bad_input.py)."""
    from test_bad_input import _assert_refused, _train

    from loop_ray.diffusion.flow.loading import save_flow_pipeline
    from loop_ray.diffusion.flow.models import tiny_flux_components

    folder = save_flow_pipeline(tiny_flux_components(), tmp_path / "flux-weights")
    config = REPO / "configs" / "flow" / "sd35m_color_loop.yaml"
    err = _assert_refused(_train(tmp_path, config, f"model.path={folder}"), tmp_path, "model.path", str(folder))
    assert "names the pipeline 'FluxPipeline'; model.kind=sd3 drives StableDiffusion3Pipeline" in err
