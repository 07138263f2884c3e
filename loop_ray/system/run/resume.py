"""`loop-ray train --resume RUN_DIR|auto`: pick the checkpoint to continue from.

RUN_DIR is a run folder (or one of its checkpoint folders); `auto` takes the newest run folder of
the config's name under its output_dir that holds a good checkpoint, and starts a fresh run when
there is none. Within a run the newest checkpoint that verifies against its manifest is used
(`loop_ray.training.checkpoint.latest_good_checkpoint`); refused ones are logged by name.

What makes the continuation exact: the plan of iteration i depends only on (seed, i)
(`loop_ray.training.plan`), the learner's shuffling only on (seed, i, rank), and sampling only on the
per-sample seeds; the learner's module and optimizer state come back from DeepSpeed's checkpoint;
the driver state brings back the policy version, images seen, the stat tracker, the metrics so far
and the driver's global RNG states. That makes a synchronous run's continuation bit-exact. In
asynchronous mode the iterations that were in flight at the stop are sampled again after the resume
with the restored (newer) weights, so the continuation is equally valid but not bit-identical.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loop_ray.config import ConfigError, ExperimentConfig
from loop_ray.training.checkpoint import latest_good_checkpoint

log = logging.getLogger(__name__)

# keys a resumed run may change: how long it runs, how it is logged, evaluated and checkpointed,
# and how the cluster is shaped (samplers and reward actors start from the published weights)
RESUMABLE_CHANGES = ("iterations", "eval.", "logging.", "checkpoint.", "cluster.", "output_dir")


@dataclass
class ResumePoint:
    run_dir: Path
    checkpoint: Path
    state: dict  # the checkpoint's driver_state.json

    @property
    def iteration(self) -> int:
        return int(self.state["iteration"])


def _run_folder(path: Path) -> Path:
    """A run folder from a run folder or one of its checkpoint folders."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path
    if path.parent.name == "checkpoints":
        return path.parent.parent
    raise ConfigError(f"--resume {path}: not a loop-ray run folder (no checkpoints/ in it)")


def newest_good_point(run: Path) -> ResumePoint | None:
    """The newest checkpoint of run folder `run` that verifies, or None (none there, or none good)."""
    found = latest_good_checkpoint(run / "checkpoints")
    return None if found is None else ResumePoint(run, *found)


def resume_point(run_dir: str | Path) -> ResumePoint:
    """The newest good checkpoint of a run folder; a clear error when it has none."""
    folder = _run_folder(Path(run_dir))
    point = newest_good_point(folder)
    if point is None:
        raise ConfigError(f"--resume {folder}: no usable checkpoint under {folder / 'checkpoints'}")
    return point


def auto_resume_point(cfg: ExperimentConfig) -> ResumePoint | None:
    """The newest run of `cfg.name` under `cfg.output_dir` with a good checkpoint, or None."""
    runs = sorted(Path(cfg.output_dir).glob(f"{cfg.name}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((point for point in map(newest_good_point, runs) if point is not None), None)


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def check_resumable(saved: ExperimentConfig, cfg: ExperimentConfig, where: Path) -> None:
    """A resumed run may change only what does not alter the maths of the run so far."""
    changed = changed_keys(saved.model_dump(mode="json"), cfg.model_dump(mode="json"))
    bad = [k for k in changed if not k.startswith(RESUMABLE_CHANGES)]
    if bad:
        raise ConfigError(
            f"--resume {where}: these keys differ from the checkpoint's config.yaml and would change the "
            f"run's maths: {', '.join(bad)} (start a new run to change them)"
        )


def capture_rng() -> dict:
    """The driver process's global RNG states (JSON-able)."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
