"""`loop-ray eval` / `loop-ray sample` and the evaluation library functions."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from loop_ray.cli.eval import main as main_eval
from loop_ray.cli.main import main as cli_main
from loop_ray.cli.sample import main as main_sample
from loop_ray.evaluation.evaluate import (
    eval_seeds,
    evaluate_policy,
    format_table,
    grid_rows,
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
    assert cli_main(["eval", "--config", str(config), "--checkpoint", str(root / "missing")]) == 2
    assert capsys.readouterr().err == f"loop-ray eval: --checkpoint {root / 'missing'}: no such folder\n"
    assert cli_main(["eval", "--config", str(config), "--set", "sampling.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loop-ray eval: ") and "sampling.nope: unknown key" in err and "Traceback" not in err
    assert cli_main(["eval", "--checkpoint", str(root / "model")]) == 2  # a model folder brings no config
    assert "--config is required" in capsys.readouterr().err


def test_main_sample(tiny_setup, capsys):
    root, config = tiny_setup
    out = root / "s.png"
    argv = ["--config", str(config), "--checkpoint", str(root / "model"), "--prompt", "a red circle",
            "--prompt", "a green square and a red triangle", "-n", "3", "--out", str(out)]
    assert main_sample(argv) == 0
    assert Image.open(out).size[1] == 2 * 68 + 4
    assert str(out) in capsys.readouterr().out


def test_sample_into_a_folder_writes_one_png_per_image_and_the_grid(tiny_setup, capsys):
    """`--out DIR` (a path without a suffix, or an existing folder): PPP-NNN.png per image plus
    grid.png; the images are the grid's cells (the same seeds)."""
    root, config = tiny_setup
    base = ["--config", str(config), "--checkpoint", str(root / "model"), "--prompt", "a red circle",
            "--prompt", "a blue square", "-n", "2"]
    out = root / "samples"
    assert cli_main(["sample", *base, "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000-000.png", "000-001.png", "001-000.png", "001-001.png", "grid.png"]
    assert Image.open(out / "001-000.png").size == (TINY_SPEC.image_size, TINY_SPEC.image_size)
    assert Image.open(out / "grid.png").size[1] == 2 * 68 + 4
    assert str(out) in capsys.readouterr().out
    again = root / "samples.d"  # an existing folder, whatever its name
    again.mkdir()
    assert cli_main(["sample", *base, "-n", "1", "--out", str(again)]) == 0
    assert sorted(p.name for p in again.iterdir()) == ["000-000.png", "001-000.png", "grid.png"]
    # image 0 of prompt 0 has seed 0 in both (loop_ray.evaluation.heldout.eval_seeds)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "000-000.png")),
                                  np.asarray(Image.open(again / "000-000.png")))


def test_sample_warns_of_a_prompt_outside_the_toy_grammar(tiny_setup, caplog):
    root, config = tiny_setup
    argv = ["sample", "--config", str(config), "--checkpoint", str(root / "model"), "-n", "1", "--out",
            str(root / "warn.png"), "--prompt", "a red circle", "--prompt", "a purple hexagon"]
    with caplog.at_level("WARNING"):
        assert cli_main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "'a purple hexagon'" in warnings[0] and "'purple', 'hexagon'" in warnings[0]
    assert "'a COLOUR SHAPE and a COLOUR SHAPE'" in warnings[0]


@pytest.mark.parametrize("name", ["grid.jpg", "notes.txt"])
def test_sample_to_a_path_that_is_neither_png_nor_folder_is_one_line(tiny_setup, capsys, name):
    root, config = tiny_setup
    out = root / name
    code = cli_main(["sample", "--config", str(config), "--checkpoint", str(root / "model"), "--prompt", "a red circle",
                     "-n", "1", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"loop-ray sample: --out {out}: give a .png file (the grid) or a folder (one PNG per image and " \
                  "grid.png)\n"
    assert not out.exists()


class ToyLearner:
    """Writes what the learner's rank 0 writes into a checkpoint (trainable.pt, unet/, and the
    whole-pipeline parts through link_frozen_parts), without DeepSpeed."""

    def __init__(self, policy):
        self.policy = policy

    def save_checkpoint(self, folder, tag):
        from loop_ray.diffusion.pipeline_parts import write_frozen_parts
        from loop_ray.filehash import write_hashed
        from loop_ray.training.checkpoint import link_frozen_parts

        state = self.policy.trainable_state_dict()
        written = {"trainable.pt": write_hashed(folder / "trainable.pt", lambda f: torch.save(state, f))}
        self.policy.unet.save_pretrained(folder / "unet")
        written.update(link_frozen_parts(folder, lambda out: write_frozen_parts(self.policy, "toy", out)))
        return written


@pytest.fixture(scope="module")
def toy_run(tiny_setup):
    """A run folder with checkpoints iter-000001..3 (keep_last 2) of the tiny toy model."""
    from loop_ray.config import load_config
    from loop_ray.diffusion.factory import build_policy
    from loop_ray.training.checkpoint import save_checkpoint

    root, config = tiny_setup
    cfg = load_config(config, [f"model.path={root / 'model'}"])
    policy = build_policy(cfg)
    run = root / "runs" / "evtest-20260101-000000"
    for it in (1, 2, 3):
        save_checkpoint(run / "checkpoints", it, cfg, ToyLearner(policy), {"iteration": it}, keep_last=2)
    return run


def test_a_checkpoint_is_a_whole_model_and_pruning_keeps_the_others_whole(toy_run):
    from loop_ray.toy.model import load_toy_components
    from loop_ray.training.checkpoint import verify_checkpoint

    checkpoints = toy_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["frozen", "iter-000002", "iter-000003"]
    for name in ("iter-000002", "iter-000003"):
        ckpt = checkpoints / name
        assert (ckpt / "text_encoder").is_symlink() and str((ckpt / "text_encoder").readlink()) == "../frozen/text_encoder"
        files = json.loads((ckpt / "MANIFEST.json").read_text())["files"]
        assert {"model_index.json", "text_encoder/model.safetensors", "tokenizer/tokenizer.json",
                "scheduler/scheduler_config.json", "unet/diffusion_pytorch_model.safetensors"} <= set(files)
        assert verify_checkpoint(ckpt)["iteration"] == int(name[-1])
        assert load_toy_components(ckpt).unet is not None


def test_eval_and_sample_take_a_checkpoint_or_a_run_folder_without_config(tiny_setup, toy_run, capsys):
    root, _ = tiny_setup
    ckpt = toy_run / "checkpoints" / "iter-000002"
    out = root / "ckpt-eval"
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--images-per-prompt", "1", "--no-progress",
                     "--set", "eval.max_prompts=2", "--out", str(out)]) == 0
    assert json.loads((out / "eval.json").read_text())["settings"]["model"] == str(ckpt)
    assert cli_main(["eval", "--checkpoint", str(toy_run), "--images-per-prompt", "1", "--no-progress",
                     "--set", "eval.max_prompts=2", "--out", str(out)]) == 0
    assert json.loads((out / "eval.json").read_text())["settings"]["model"].endswith("iter-000003")  # the newest
    png = root / "ckpt-sample.png"
    assert cli_main(["sample", "--checkpoint", str(toy_run), "--prompt", "a red circle", "-n", "2", "--out", str(png)]) == 0
    assert Image.open(png).size[1] == 68 + 4
    capsys.readouterr()


def test_a_damaged_or_old_checkpoint_is_one_line_naming_it(tiny_setup, toy_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(toy_run, run, symlinks=True)
    ckpt = run / "checkpoints" / "iter-000003"
    weights = run / "checkpoints" / "frozen" / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert cli_main(["eval", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"loop-ray eval: checkpoint {ckpt}: text_encoder/model.safetensors does not match")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert cli_main(["sample", "--checkpoint", str(run), "--prompt", "a red circle"]) == 2  # every checkpoint links it
    assert f"loop-ray sample: --checkpoint {run}: no usable checkpoint" in capsys.readouterr().err

    shutil.rmtree(run / "checkpoints" / "frozen")
    assert cli_main(["eval", "--checkpoint", str(ckpt)]) == 2
    assert "is missing (through the link scheduler -> ../frozen/scheduler)" in capsys.readouterr().err

    from loop_ray.training.checkpoint import write_manifest

    old = tmp_path / "old" / "checkpoints" / "iter-000001"  # written before checkpoints held the pipeline
    shutil.copytree(toy_run / "checkpoints" / "iter-000002", old, symlinks=True)
    for part in old.iterdir():
        if part.is_symlink() or part.name in ("model_index.json", "MANIFEST.json"):
            part.unlink()
    write_manifest(old, {})
    assert cli_main(["eval", "--checkpoint", str(old)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not the whole pipeline" in err and str(old) in err
