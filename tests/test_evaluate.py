"""`loop-ray eval` / `loop-ray sample` and the evaluation library functions."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from loop_ray.evaluate import (
    eval_seeds,
    evaluate_policy,
    format_table,
    grid_rows,
    main_eval,
    main_sample,
    save_grid,
)
from loop_ray.prompts import load_prompts
from loop_ray.toy.grammar import CATEGORIES
from loop_ray.toy.model import TINY_SPEC, build_toy_components, save_toy_model
from loop_ray.toy.render import render_batch
from loop_ray.toy.reward import binding_reward


class RenderingPolicy:
    """A test double whose samples are ground-truth renders seeded by the sample seed."""

    def __init__(self):
        self.calls = []

    def sample(self, prompts, k, seeds, batch_size=None):
        self.calls.append((list(prompts), k, list(seeds)))
        expanded = [p for p in prompts for _ in range(k)]
        images = torch.from_numpy(render_batch(expanded, [s % 2**31 for s in seeds]))
        return SimpleNamespace(images=images, prompts=expanded)


def test_evaluate_policy_reduces_per_category():
    prompts = load_prompts("toy:val")
    policy = RenderingPolicy()
    result = evaluate_policy(policy, binding_reward, prompts, images_per_prompt=2, seed=7, batch_size=8)
    assert list(result["categories"]) == list(dict.fromkeys(prompts.categories))
    assert all(v["mean"] >= 0.95 and v["images"] == 2 * v["prompts"] for v in result["categories"].values())
    assert result["images"].shape == (len(prompts), 2, 32, 32, 3) and result["rewards"].shape == (len(prompts), 2)
    seeds = [s for call in policy.calls for s in call[2]]
    assert seeds == eval_seeds(7, range(len(prompts)), 2)
    assert all(len(call[0]) <= 4 for call in policy.calls)  # batch_size // k prompts per call
    table = format_table(result)
    for category in CATEGORIES:
        assert category in table
    again = evaluate_policy(RenderingPolicy(), binding_reward, prompts, 2, seed=7, batch_size=40)
    assert np.array_equal(again["rewards"], result["rewards"])  # chunking does not change the seeds
    with pytest.raises(ValueError, match="images_per_prompt"):
        evaluate_policy(policy, binding_reward, prompts, 0)


def test_save_grid_writes_prompts_beside_images(tmp_path):
    images = np.stack([render_batch(["a red circle"] * 3, [0, 1, 2]), render_batch(["a blue triangle"] * 3, [3, 4, 5])])
    path = save_grid(images, ["a red circle", "a blue triangle"], tmp_path / "g.png", rewards=np.ones((2, 3)), cell=40)
    grid = np.asarray(Image.open(path))
    assert grid.shape[0] == 2 * 44 + 4 and grid.shape[1] > 3 * 44
    text = grid[:, 3 * 44 + 4 :]
    assert (text < 128).any()  # the prompt text is drawn
    with pytest.raises(ValueError, match="prompts"):
        save_grid(images, ["only one"], tmp_path / "bad.png")
    assert grid_rows(["a", "a", "a", "b", "c"], 3) == [0, 3, 4]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaltiny")
    save_toy_model(build_toy_components(TINY_SPEC, seed=0), root / "model")
    config = root / "cfg.yaml"
    config.write_text(f"name: evtest\noutput_dir: {root / 'runs'}\nmodel:\n  kind: toy\nsampling:\n  num_steps: 3\n")
    return root, config


def test_main_eval_on_a_tiny_model(tiny_setup, capsys):
    root, config = tiny_setup
    args = ["--config", str(config), "--checkpoint", str(root / "model"), "--images-per-prompt", "1", "--no-progress"]
    assert main_eval([*args, "--set", "eval.grid_prompts=4"]) == 0
    out = capsys.readouterr().out
    for category in CATEGORIES:
        assert category in out
    data = json.loads((root / "runs" / "evtest" / "eval" / "eval.json").read_text())
    assert set(data["categories"]) == set(CATEGORIES) and 0.0 <= data["mean"] <= 1.0
    assert data["settings"]["sampling"]["num_steps"] == 3 and data["images_per_prompt"] == 1
    assert Image.open(root / "runs" / "evtest" / "eval" / "grid.png").size[1] == 4 * 68 + 4
    with pytest.raises(SystemExit, match="checkpoint"):
        main_eval(["--config", str(config), "--checkpoint", str(root / "missing")])
    with pytest.raises(SystemExit, match="sampling.nope"):
        main_eval(["--config", str(config), "--set", "sampling.nope=1"])


def test_main_sample(tiny_setup, capsys):
    root, config = tiny_setup
    out = root / "s.png"
    argv = ["--config", str(config), "--checkpoint", str(root / "model"), "--prompt", "a red circle",
            "--prompt", "a green square and a red triangle", "-n", "3", "--out", str(out)]
    assert main_sample(argv) == 0
    assert Image.open(out).size[1] == 2 * 68 + 4
    assert str(out) in capsys.readouterr().out
