"""Use what you trained: a short real run (local Ray, DeepSpeed on the CPU) on the debug config
(tiny_sd) and on the toy config; its checkpoint is a whole pipeline that `loop-ray eval` and
`loop-ray sample` take as a checkpoint folder or as the run folder (no --config), and that the
pipeline's own loader reads with no loop-ray code (StableDiffusionPipeline.from_pretrained; the toy
model's load_toy_components)."""

import json

import pytest
import torch
from PIL import Image

from loop_ray.cli.main import main as cli_main
from loop_ray.config import load_config
from loop_ray.system.run.driver import train

pytestmark = pytest.mark.slow

SMALL = {"iterations": 1, "eval.max_prompts": 1, "eval.images_per_prompt": 1, "logging.tensorboard": False}
TOY_SMALL = {  # the toy config cut down to the debug config's size
    **SMALL, "sampling.num_steps": 6, "sampling.prompts_per_iteration": 2, "sampling.batch_size": 8,
    "learner.num_workers": 1, "learner.num_cpus_per_worker": 0.5, "learner.minibatch_size": 4,
    "learner.minibatches_per_step": 1, "algorithm.timestep_fraction": 0.5, "cluster.num_samplers": 1,
    "cluster.sampler_cpus": 0.5, "cluster.reward_cpus": 0.25, "eval.batch_size": 8, "logging.progress_bar": False,
}


def _use(run, tmp_path, capsys):
    """eval on the checkpoint and on the run folder, sample; returns the checkpoint folder."""
    (ckpt,) = sorted((run / "checkpoints").glob("iter-*"))
    assert (ckpt / "model_index.json").is_file() and (ckpt / "text_encoder").is_symlink()
    for target in (ckpt, run):
        out = tmp_path / f"eval-{target.name}"
        assert cli_main(["eval", "--checkpoint", str(target), "--no-progress", "--out", str(out)]) == 0
        assert json.loads((out / "eval.json").read_text())["settings"]["model"] == str(ckpt)
    png = tmp_path / "samples.png"
    assert cli_main(["sample", "--checkpoint", str(run), "--prompt", "a red circle", "-n", "2", "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 0
    capsys.readouterr()
    return ckpt


def test_a_debug_run_checkpoint_is_a_stable_diffusion_pipeline(ray_session, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    run = train(load_config("configs/debug.yaml", {**SMALL, "output_dir": str(tmp_path / "runs")})).run_dir
    ckpt = _use(run, tmp_path, capsys)
    pipe = StableDiffusionPipeline.from_pretrained(ckpt)
    trained = torch.load(ckpt / "trainable.pt")
    unet = pipe.unet.state_dict()
    assert all(torch.equal(unet[k], v) for k, v in trained.items())
    images = pipe("a red circle", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3)


def test_a_toy_run_checkpoint_loads_as_the_toy_model(ray_session, tmp_path, capsys):
    from loop_ray.diffusion.condition_gain import add_condition_gain, merged_state_dict
    from loop_ray.toy.model import load_toy_components

    cfg = load_config("configs/toy.yaml", {**TOY_SMALL, "output_dir": str(tmp_path / "runs")})
    assert cfg.model.trainable == "condition_gain"  # make run's design: the checkpoint merges the gains
    run = train(cfg).run_dir
    ckpt = _use(run, tmp_path, capsys)
    unet = load_toy_components(ckpt).unet.state_dict()
    trained = torch.load(ckpt / "trainable.pt")
    assert trained and all(k.endswith("condition_gain") for k in trained)
    assert any(not torch.equal(v, torch.ones_like(v)) for v in trained.values())  # the gains moved
    # the saved network is the pre-trained one with the trained gains folded into its projections
    expected = load_toy_components().unet
    add_condition_gain(expected)
    expected.load_state_dict(trained, strict=False)
    merged = merged_state_dict(expected)
    assert merged.keys() == unet.keys()
    assert all(torch.equal(unet[k], v) for k, v in merged.items())

    # a damaged checkpoint: one line naming it, status 2
    rel = "unet/diffusion_pytorch_model.safetensors"
    size = json.loads((ckpt / "MANIFEST.json").read_text())["files"][rel]["bytes"]
    (ckpt / rel).write_bytes((ckpt / rel).read_bytes()[:100])
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err == f"loop-ray eval: checkpoint {ckpt}: {rel} has 100 bytes, the manifest says {size} (truncated?)\n"
    assert cli_main(["eval", "--checkpoint", str(run / "no-such-checkpoint")]) == 2
    assert capsys.readouterr().err == f"loop-ray eval: --checkpoint {run / 'no-such-checkpoint'}: no such folder\n"
