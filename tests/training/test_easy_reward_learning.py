"""The machinery learns: configs/toy_easy.yaml, shortened, raises the held-out
`toy_object_area` reward of the embedded world well beyond the same run with its advantages
shuffled across samples (`algorithm.control: shuffle`, the null)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from loop_ray.config import config_from_dict, read_config_data
from loop_ray.toy.grammar import COLOURS
from loop_ray.toy.render import BACKGROUND
from loop_ray.toy.reward import object_area_reward
from loop_ray.training.single_process import SingleProcessRun

pytestmark = pytest.mark.slow

SHORT = {
    "iterations": 6,
    "sampling.prompts_per_iteration": 64,  # 256 images per iteration as in the config, 1,536 in all
    "learner.num_workers": 1,
    "learner.minibatches_per_step": 8,  # one process: 16 x 8 = 128 samples per optimizer step, as in the config
    "eval.max_prompts": 12,
    "eval.images_per_prompt": 4,
}


def _gain(control: str) -> tuple[float, list[float]]:
    data = read_config_data("configs/toy_easy.yaml")
    cfg = config_from_dict(data, "configs/toy_easy.yaml", {**SHORT, "algorithm.control": control})
    result = SingleProcessRun(cfg).run()
    return result["after"]["mean"] - result["before"]["mean"], [h["train/reward_mean"] for h in result["history"]]


def test_object_area_reward_is_the_covered_share_of_the_canvas():
    grey = np.empty((1, 24, 24, 3), dtype=np.uint8)
    grey[:] = np.asarray(BACKGROUND, dtype=np.uint8)
    half, quarter = grey.copy(), grey.copy()
    half[0, :, :12] = COLOURS["red"]  # any palette colour counts, asked for or not
    quarter[0, :12, :12] = COLOURS["blue"]
    scores = object_area_reward(np.concatenate([grey, half, quarter]), ["a red circle"] * 3)
    np.testing.assert_allclose(scores, [0.0, 0.5, 0.25], atol=1e-6)


def test_loop_raises_the_easy_reward_far_above_its_shuffled_control():
    torch.manual_seed(0)
    true_gain, true_curve = _gain("none")
    null_gain, _ = _gain("shuffle")
    # Measured: +0.071 against +0.006 at this size (the reward starts at 0.13; 768 images gave only
    # +0.032 against +0.017, too close to call); the held-out
    # evaluation uses the same prompts and seeds before and after, so its noise largely cancels.
    assert true_gain > 0.03 and true_gain > null_gain + 0.03, (true_gain, null_gain, true_curve)


def test_seeds_vs_null_summary_reports_gain_spread_and_z():
    """scripts/seeds_vs_null.py's table: mean gain +- s.e. over seeds and z of true minus null."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("seeds_vs_null", Path("scripts/seeds_vs_null.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runs = [{"overrides": {"algorithm.control": ctl}, "before": {"all": 0.5}, "after": {"all": 0.5 + g}}
            for ctl, gains in (("none", [0.1, 0.2, 0.3]), ("shuffle", [0.0, 0.0, 0.0])) for g in gains]
    row = module.summarise(runs).splitlines()[2]
    # true: mean 0.2, s.e. 0.1 / sqrt(3) = 0.0577; null: 0 +- 0; z = 0.2 / 0.0577 = 3.46
    assert row == "| all | 0.500 | +0.200 ± 0.058 | +0.000 ± 0.000 | +3.5 | +0.100, +0.200, +0.300 |"
