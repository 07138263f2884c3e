"""Bad input fails before any Ray starts: an invalid config, a missing model, an empty, unreadable or
missing prompt file, an unknown reward. Each case runs the real CLI (`python -m loop_ray.cli train`)
in a subprocess and expects exit status 2 (the CLI's status for a configuration error), one error on
stderr naming the key and the file (no traceback), no Ray (RAY_TMPDIR points at a folder that Ray
would create its session in, and it must stay absent) and no run folder.

The in-process rules (impossible combinations, the cluster's resource keys, rewards by import path)
are in test_config.py and test_system_e2e.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "debug.yaml"


def _config(tmp_path: Path, old: str, new: str) -> Path:
    """configs/debug.yaml with one line replaced."""
    text = DEBUG.read_text()
    assert old in text
    path = tmp_path / "experiment.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def _train(tmp_path: Path, config: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # would make it connect, not start
    env.update(RAY_TMPDIR=str(tmp_path / "ray-tmp"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    args = [sys.executable, "-m", "loop_ray.cli", "train", "--config", str(config),
            "--set", f"output_dir={tmp_path / 'runs'}"]
    for item in overrides:
        args += ["--set", item]
    return subprocess.run(args, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _assert_refused(p: subprocess.CompletedProcess, tmp_path: Path, *names: str) -> str:
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert p.stderr.startswith("loop-ray train: ") and "Traceback" not in p.stderr, p.stderr
    for name in names:
        assert name in p.stderr, f"{name!r} not named in:\n{p.stderr}"
    assert "Started a local Ray instance" not in out and "Connecting to existing Ray cluster" not in out
    assert not (tmp_path / "ray-tmp").exists(), "a Ray session was created"
    assert not (tmp_path / "runs").exists(), "a run folder was created"
    return p.stderr


# ------------------------------------------------------------------------------ the config file
def test_yaml_syntax_error_names_the_file(tmp_path):
    config = _config(tmp_path, "  k: 4\n", "  k: [4\n")
    err = _assert_refused(_train(tmp_path, config), tmp_path, str(config), "not valid YAML")
    assert "line" in err  # where in the file


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    config = _config(tmp_path, "  num_steps: 4\n", "  num_steps: 4\n  num_step: 8\n")
    _assert_refused(_train(tmp_path, config), tmp_path, str(config), "sampling.num_step: unknown key")


def test_wrong_type_names_the_key_and_the_file(tmp_path):
    config = _config(tmp_path, "  k: 4\n", "  k: four\n")
    _assert_refused(_train(tmp_path, config), tmp_path, str(config), "sampling.k:", "valid integer")


# ---------------------------------------------------------------------------------- the model
def test_missing_stable_diffusion_folder_names_model_path(tmp_path):
    folder = tmp_path / "no-such-model"
    p = _train(tmp_path, DEBUG, "model.kind=stable_diffusion", f"model.path={folder}")
    _assert_refused(p, tmp_path, "model.path", str(folder))


def test_incomplete_stable_diffusion_folder_names_what_is_missing(tmp_path):
    folder = tmp_path / "sd-model"
    (folder / "unet").mkdir(parents=True)
    p = _train(tmp_path, DEBUG, "model.kind=stable_diffusion", f"model.path={folder}")
    _assert_refused(p, tmp_path, "model.path", str(folder),
                    "missing vae/, text_encoder/, tokenizer/, scheduler/")


def test_toy_model_path_to_an_empty_folder_names_model_path(tmp_path):
    folder = tmp_path / "toy-model"
    folder.mkdir()
    p = _train(tmp_path, DEBUG, "model.kind=toy", f"model.path={folder}")
    _assert_refused(p, tmp_path, "model.path", str(folder), "missing unet/")


# ---------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("text", ["", "\n# only comments\n   \n# and blank lines\n"],
                         ids=["empty", "comments"])
def test_prompt_file_without_prompts_names_the_key_and_the_file(tmp_path, text):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)
    p = _train(tmp_path, DEBUG, f"prompts.train={prompts}")
    _assert_refused(p, tmp_path, "prompts.train", str(prompts), "has no prompts")


def test_unreadable_prompt_file_names_the_key_and_the_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    prompts.chmod(0)
    try:
        try:
            prompts.read_bytes()
        except PermissionError:
            pass
        else:  # root, or CAP_DAC_OVERRIDE: mode 000 does not stop it reading
            pytest.skip("this user can read a file with mode 000 (root)")
        p = _train(tmp_path, DEBUG, f"prompts.val={prompts}")
    finally:
        prompts.chmod(0o644)
    _assert_refused(p, tmp_path, "prompts.val", str(prompts), "is unreadable", "Permission denied")


def test_prompt_file_that_is_not_text_names_the_key_and_the_file(tmp_path):
    prompts = tmp_path / "prompts.txt"  # unreadable as UTF-8 text, whoever reads it
    prompts.write_bytes(b"\xff\xfe\x00a red cube\n")
    p = _train(tmp_path, DEBUG, f"prompts.train={prompts}")
    _assert_refused(p, tmp_path, "prompts.train", str(prompts), "is unreadable")


def test_missing_prompt_file_names_the_key_and_the_file(tmp_path):
    prompts = tmp_path / "no-such-prompts.txt"
    p = _train(tmp_path, DEBUG, f"prompts.train={prompts}")
    _assert_refused(p, tmp_path, "prompts.train", str(prompts), "not found")


def test_prompt_path_to_a_folder_names_the_key_and_the_folder(tmp_path):
    p = _train(tmp_path, DEBUG, f"prompts.val={tmp_path}")
    _assert_refused(p, tmp_path, "prompts.val", str(tmp_path), "is a folder")


# ---------------------------------------------------------------------------------- rewards
def test_unknown_reward_names_the_key_and_the_registered_rewards(tmp_path):
    p = _train(tmp_path, DEBUG, "reward.terms.0.name=no_such_reward")
    _assert_refused(p, tmp_path, "reward.terms.0.name", "'no_such_reward'", "jpeg_compressibility")


# ------------------------------------------------------------------- the other commands' paths
@pytest.mark.parametrize("argv, named", [
    (["eval", "--checkpoint", "{tmp}/no-such-run"], "--checkpoint {tmp}/no-such-run: no such folder"),
    (["eval"], "--config is required"),
    (["sample", "--config", str(DEBUG), "--prompt", "x", "--out", "{tmp}/file.txt/grid.png"], "--out {tmp}/file.txt"),
    (["pretrain-toy", "--tiny", "--steps", "1", "--out", "{tmp}/file.txt/model"], "--out {tmp}/file.txt/model"),
    (["diagnose", "--config", "{tmp}/no-such.yaml"], "{tmp}/no-such.yaml"),
], ids=["eval-checkpoint", "eval-no-config", "sample-out", "pretrain-out", "diagnose-config"])
def test_other_commands_name_a_bad_path_in_one_line(tmp_path, argv, named):
    (tmp_path / "file.txt").write_text("a file where a folder is wanted\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    p = subprocess.run([sys.executable, "-m", "loop_ray.cli", *args], check=False, cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.startswith("loop-ray ")]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith(f"loop-ray {argv[0]}: "), p.stderr
    assert named.replace("{tmp}", str(tmp_path)) in lines[0], p.stderr
