"""Weights & Biases beside TensorBoard (`logging.wandb: {project, entity, mode}`; the `wandb` extra).

A run folder's W&B run gets the same scalars as TensorBoard at the same step (images seen), the
evaluation image grids as images, and the resolved config. Its id is kept in the run folder
(`wandb_run.json`), so `loop-ray train --resume` continues the same W&B run (`resume="allow"`);
records that a resumed run logs again for steps W&B already has are dropped by W&B, which keeps
the ones logged before the stop. W&B's own files go under the run folder (`wandb/`) unless
WANDB_DIR says otherwise; an offline run is uploaded later with `wandb sync RUN/wandb/offline-run-*`.

wandb is imported only when the config asks for it, so loop-ray runs without it installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loop_ray.config import ConfigError, ExperimentConfig, WandbConfig

RUN_ID_FILE = "wandb_run.json"


def import_wandb():
    """The wandb module, or a ConfigError saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "logging.wandb is set but the wandb package is not installed: pip install 'loop-ray[wandb]' "
            "(or remove logging.wandb)"
        ) from None
    return wandb


def stored_run_id(run_path: Path) -> str | None:
    """The W&B run id a run folder was logged to, if any."""
    path = Path(run_path) / RUN_ID_FILE
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["id"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a W&B run id file ({err}); delete it to start a new W&B run") from None


class WandbLogger:
    """One W&B run for one run folder."""

    def __init__(self, run):
        self._run = run

    @classmethod
    def start(cls, settings: WandbConfig, cfg: ExperimentConfig, run_path: Path) -> WandbLogger:
        """Start the W&B run of `run_path`, or continue the one its run id file names."""
        wandb = import_wandb()
        run_path = Path(run_path)
        run_id = stored_run_id(run_path)
        try:
            run = wandb.init(
                project=settings.project, entity=settings.entity, mode=settings.mode, name=run_path.name,
                id=run_id, resume="allow" if run_id else None,
                # explicit each time: wandb reads WANDB_DIR only once per process
                dir=os.environ.get("WANDB_DIR") or str(run_path),
            )
        except Exception as err:  # noqa: BLE001 - wandb raises many kinds (no login, network, settings)
            raise ConfigError(f"logging.wandb: W&B did not start: {type(err).__name__}: {err}") from None
        run.config.update(cfg.model_dump(mode="json"), allow_val_change=True)
        if run_id is None:
            (run_path / RUN_ID_FILE).write_text(json.dumps({"id": run.id, "project": settings.project,
                                                            "entity": settings.entity}) + "\n")
        return cls(run)

    @property
    def run_id(self) -> str:
        return self._run.id

    def log(self, scalars: dict[str, float], step: int) -> None:
        if scalars:
            self._run.log(scalars, step=step)

    def log_image(self, key: str, path: Path, step: int, caption: str | None = None) -> None:
        import wandb

        self._run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def finish(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)
