"""Checks of an experiment's inputs that need more than the config schema, run before any actor
starts: prompt sources resolve, reward names are registered, model files exist, the learner
backend fits the devices. Each failure is a ConfigError naming the key and the file or value."""

from __future__ import annotations

from pathlib import Path

from loop_ray.config import ConfigError, ExperimentConfig
from loop_ray.prompts import PromptSet, load_prompts


def _prompts(cfg: ExperimentConfig, key: str) -> PromptSet:
    spec = getattr(cfg.prompts, key)
    try:
        return load_prompts(spec)
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise ConfigError(f"prompts.{key}={spec!r}: {err}") from None


def _check_rewards(cfg: ExperimentConfig) -> None:
    from loop_ray.rewards import available_rewards

    names = available_rewards()
    for i, term in enumerate(cfg.reward.terms):
        if term.name not in names:
            raise ConfigError(f"reward.terms.{i}.name: unknown reward {term.name!r}; registered rewards: {names}")


def _check_model(cfg: ExperimentConfig) -> None:
    kind, path = cfg.model.kind, cfg.model.path
    if kind == "toy":
        from loop_ray.toy.model import default_model_path

        folder = Path(path) if path else default_model_path()
        if not (folder / "unet").is_dir():
            raise ConfigError(
                f"model.path: no toy model at {folder} (expected unet/, text_encoder/, tokenizer/, scheduler/); "
                "pre-train one with `loop-ray pretrain-toy` or point model.path at one"
            )
    # a path that looks local must be a folder; anything else may be a Hugging Face id
    local = kind == "stable_diffusion" and path and path.startswith((".", "/", "~"))
    if local and not Path(path).expanduser().is_dir():
        raise ConfigError(f"model.path: {path!r} is not a folder (a diffusers Stable Diffusion folder expected)")


def _check_learner(cfg: ExperimentConfig) -> None:
    lrn = cfg.learner
    if lrn.backend == "nccl" and lrn.num_gpus_per_worker == 0:
        raise ConfigError("learner.backend=nccl needs GPUs: set learner.num_gpus_per_worker > 0 or backend gloo/auto")
    if lrn.zero_stage == 3:
        raise ConfigError(
            "learner.zero_stage=3: the learner publishes weights from rank 0's full copy, which ZeRO-3 "
            "partitions away; use stage 0, 1 or 2"
        )


def validate_inputs(cfg: ExperimentConfig) -> tuple[PromptSet, PromptSet]:
    """Run every check; returns the (train, val) prompt sets."""
    train_set, val_set = _prompts(cfg, "train"), _prompts(cfg, "val")
    _check_rewards(cfg)
    _check_model(cfg)
    _check_learner(cfg)
    return train_set, val_set
