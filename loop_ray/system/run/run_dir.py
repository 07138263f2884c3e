"""A run's output folder: cfg.output_dir/<name>-<timestamp>/ with

  config.yaml        the resolved configuration
  metrics.jsonl      one JSON record per iteration and per evaluation
  tensorboard/       TensorBoard events of the scalar metrics
  wandb_run.json     the W&B run id, with logging.wandb (see loop_ray.system.run.wandb_logger)
  wandb/             W&B's own files (unless WANDB_DIR is set)
  eval/              image grids of each evaluation
  reward.png         train and eval reward against images seen
  checkpoints/       see loop_ray.training.checkpoint
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from loop_ray.config import ExperimentConfig, dump_config
from loop_ray.system.run.metrics import scalars


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    return value


class RunDir:
    def __init__(self, path: Path, tensorboard: bool, purge_step: int | None = None):
        self.path = path
        (path / "eval").mkdir(parents=True, exist_ok=True)
        (path / "checkpoints").mkdir(exist_ok=True)
        self._metrics = open(path / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(path / "tensorboard"), purge_step=purge_step)
        self._wandb = None
        self.train_points: list[tuple[int, float]] = []
        self.eval_points: list[tuple[int, float]] = []

    def _start_wandb(self, cfg: ExperimentConfig) -> None:
        """With logging.wandb: start the folder's W&B run, or continue the one it was logged to."""
        if cfg.logging.wandb is not None:
            from loop_ray.system.run.wandb_logger import WandbLogger

            try:
                self._wandb = WandbLogger.start(cfg.logging.wandb, cfg, self.path)
            except BaseException:
                self.close()
                raise

    @classmethod
    def create(cls, cfg: ExperimentConfig) -> RunDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path(cfg.output_dir) / f"{cfg.name}-{stamp}-{n}"
        path.mkdir(parents=True)
        run = cls(path, cfg.logging.tensorboard)
        dump_config(cfg, path / "config.yaml")
        run._start_wandb(cfg)
        return run

    @classmethod
    def reopen(cls, path: Path, cfg: ExperimentConfig, records: list[dict], images_seen: int) -> RunDir:
        """Continue a run folder from a checkpoint: metrics.jsonl is rewritten with the records the
        checkpoint holds (anything logged after it is dropped, to be logged again), TensorBoard
        purges its events after `images_seen`, config.yaml gets the resumed configuration, and the
        W&B run the folder was logged to is continued."""
        tmp = path / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(_jsonable(r)) + "\n" for r in records))
        tmp.replace(path / "metrics.jsonl")
        run = cls(path, cfg.logging.tensorboard, purge_step=images_seen + 1 if images_seen else None)
        dump_config(cfg, path / "config.yaml")
        run._start_wandb(cfg)
        for r in records:
            if r.get("kind") == "train":
                run.add_train_point(r["images_seen"], r["train/reward_mean"])
            elif r.get("kind") == "eval":
                run.add_eval_point(r["images_seen"], r["eval/reward_mean"])
        return run

    def rewind(self, records: list[dict], images_seen: int, tensorboard: bool) -> None:
        """Go back to a checkpoint within this process (the learner group was rebuilt from it):
        metrics.jsonl keeps only `records`, TensorBoard purges its events after `images_seen`,
        the reward plot's points are those of `records`. W&B keeps what it was sent."""
        self._metrics.close()
        tmp = self.path / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(_jsonable(r)) + "\n" for r in records))
        tmp.replace(self.path / "metrics.jsonl")
        self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in close())
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tensorboard"), purge_step=images_seen + 1)
        self.train_points = [(r["images_seen"], r["train/reward_mean"]) for r in records if r.get("kind") == "train"]
        self.eval_points = [(r["images_seen"], r["eval/reward_mean"]) for r in records if r.get("kind") == "eval"]

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def log(self, record: dict, step: int) -> None:
        """Append a record to metrics.jsonl and its scalars (`metrics.scalars`) to TensorBoard and
        W&B at `step` (images seen)."""
        self._metrics.write(json.dumps(_jsonable(record)) + "\n")
        values = scalars(record)
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step)

    def log_image(self, key: str, path: Path, step: int, caption: str | None = None) -> None:
        """An image file (an evaluation grid) to W&B at `step`; it is already in the run folder."""
        if self._wandb is not None:
            self._wandb.log_image(key, path, step, caption)

    def add_train_point(self, images_seen: int, reward: float) -> None:
        self.train_points.append((images_seen, reward))

    def add_eval_point(self, images_seen: int, reward: float) -> None:
        self.eval_points.append((images_seen, reward))

    def plot(self) -> Path:
        """reward.png: mean train reward per iteration and mean eval reward against images seen."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        if self.train_points:
            x, y = zip(*self.train_points)
            ax.plot(x, y, ".-", alpha=0.6, label="train (sampled prompts)")
        if self.eval_points:
            x, y = zip(*self.eval_points)
            ax.plot(x, y, "o-", label="eval (held-out prompts)")
        ax.set_xlabel("images seen")
        ax.set_ylabel("mean reward")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.path / "reward.png"
        fig.savefig(out)
        plt.close(fig)
        return out

    def close(self, failed: bool = False) -> None:
        """Close the loggers; `failed` marks the W&B run as failed (the run stopped on an error)."""
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish(failed)
            self._wandb = None
