"""Checkpoints, written atomically: everything goes into checkpoints/.tmp-iter-NNNNNN/ and the folder
is renamed to checkpoints/iter-NNNNNN/ only when complete, so a crash never leaves a half
checkpoint under a final name. Layout:

  trainable.pt        the policy's trainable state dict (learner rank 0)
  deepspeed/<tag>/    DeepSpeed's checkpoint: module, optimizer state (every rank's ZeRO partition)
  driver_state.json   iteration, policy version, images seen, the advantage tracker's state
  config.yaml         the run's resolved configuration

The learner workers write into the folder themselves, so on a multi-node cluster `output_dir`
must be a filesystem every learner node shares with the driver.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loop_ray.config import ExperimentConfig, dump_config


def checkpoint_name(iteration: int) -> str:
    return f"iter-{iteration:06d}"


def save_checkpoint(
    root: Path, iteration: int, cfg: ExperimentConfig, learner, driver_state: dict, keep_last: int
) -> Path:
    """Write the checkpoint after `iteration` iterations; returns its final folder."""
    name = checkpoint_name(iteration)
    final, tmp = root / name, root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    learner.save_checkpoint(tmp.resolve(), tag=name)
    (tmp / "driver_state.json").write_text(json.dumps(driver_state))
    dump_config(cfg, tmp / "config.yaml")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("iter-*") if p.is_dir())
    for old in done[:-keep_last]:
        shutil.rmtree(old)

