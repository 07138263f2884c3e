"""Checks of an experiment's inputs that need more than the config schema, run before any actor
starts: prompt sources resolve, reward names are registered or import, model files exist, the learner
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
    """Registered names are known; import paths ("package.module:callable") import here, in the
    driver (the reward actors import them again, so they must be importable there too)."""
    from loop_ray.rewards import available_rewards, is_import_path, load_import_path

    names = available_rewards()
    for i, term in enumerate(cfg.reward.terms):
        if is_import_path(term.name):
            try:
                load_import_path(term.name)
            except (ImportError, TypeError, ValueError) as err:
                raise ConfigError(f"reward.terms.{i}.name: {err}") from None
            except Exception as err:  # noqa: BLE001 - importing user code may raise anything
                raise ConfigError(
                    f"reward.terms.{i}.name: importing {term.name!r} raised {type(err).__name__}: {err}"
                ) from None
        elif term.name not in names:
            raise ConfigError(f"reward.terms.{i}.name: unknown reward {term.name!r}; registered rewards: {names}")


def _check_model(cfg: ExperimentConfig) -> None:
    """The model folder is complete, as the actors' loaders will want it. A Stable Diffusion path
    that looks local (./, /, ~) is checked here; anything else may be a Hugging Face id, resolved
    from the cache of the nodes the actors run on."""
    kind, path = cfg.model.kind, cfg.model.path
    if kind == "toy":
        from loop_ray.toy.model import PARTS, default_model_path

        folder = Path(path) if path else default_model_path()
        missing = [f"{p}/" for p in PARTS if not (folder / p).is_dir()]
        missing += [] if (folder / "model_index.json").is_file() else ["model_index.json"]
        if missing:
            what = f"missing {', '.join(missing)}" if folder.is_dir() else "no such folder"
            raise ConfigError(
                f"model.path: no toy model at {folder} ({what}; expected unet/, text_encoder/, "
                "tokenizer/, scheduler/, model_index.json); pre-train one with `loop-ray pretrain-toy` "
                "or point model.path at one"
            )
    if kind == "stable_diffusion" and path and path.startswith((".", "/", "~")):
        from loop_ray.diffusion.stable_diffusion import resolve_model_folder

        try:
            resolve_model_folder(path, cfg.model.revision)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.path: {err}") from None
    if kind in ("sd3", "flux") and path:
        _check_flow_model(cfg)


def _check_flow_model(cfg: ExperimentConfig) -> None:
    """An SD3 / FLUX folder: the pipeline class its model_index.json names, every component folder and a
    flow-matching scheduler. A Hugging Face id is checked when the driver's cache holds it."""
    from loop_ray.diffusion.flow_loading import check_flow_folder, resolve_flow_folder

    kind, path = cfg.model.kind, cfg.model.path
    try:
        if path.startswith((".", "/", "~")):
            resolve_flow_folder(path, kind, cfg.model.revision)
            return
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(path, revision=cfg.model.revision, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached here: the nodes resolve it from their own caches
            return
        check_flow_folder(folder, kind)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path: {err}") from None


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
