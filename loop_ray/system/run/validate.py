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


def _check_runtime_env(env, key: str) -> None:
    """The local folders and files a runtime_env names exist (URIs, with '://', are the cluster's
    business)."""
    local = [(f"{key}.working_dir", env.working_dir)] if env.working_dir else []
    local += [(f"{key}.py_modules.{j}", m) for j, m in enumerate(env.py_modules or [])]
    for where, path in local:
        if "://" in path:
            continue
        if not Path(path).expanduser().exists():
            raise ConfigError(f"{where}: {path!r} does not exist (a local folder or .zip/.whl file, "
                              "or a URI such as s3://...)")
        if where.endswith("working_dir") and not Path(path).expanduser().is_dir() and not path.endswith(".zip"):
            raise ConfigError(f"{where}: {path!r} is neither a folder nor a .zip file")


def _check_rewards(cfg: ExperimentConfig) -> None:
    """Registered names are known and their kwargs pass the builder's own check; import paths
    ("package.module:callable") import here, in the driver (the reward actors import them again, so
    they must be importable there too), except for terms scored in a runtime_env (their code or
    dependencies may exist only there: their actors report an import error when they start)."""
    from loop_ray.rewards import available_rewards, is_import_path, load_import_path, registered_builder

    names = available_rewards()
    if cfg.reward.runtime_env is not None:
        _check_runtime_env(cfg.reward.runtime_env, "reward.runtime_env")
    for i, term in enumerate(cfg.reward.terms):
        if term.runtime_env is not None:
            _check_runtime_env(term.runtime_env, f"reward.terms.{i}.runtime_env")
        elsewhere = term.runtime_env is not None or cfg.reward.runtime_env is not None
        if is_import_path(term.name):
            module, _, attr = term.name.partition(":")
            if not module or not attr:
                raise ConfigError(f"reward.terms.{i}.name: {term.name!r}: an import path is written "
                                  "'package.module:callable'")
            if elsewhere:
                continue
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
        else:
            check = getattr(registered_builder(term.name), "check_kwargs", None)
            if check is not None:
                try:
                    check(term.kwargs, prefix=f"reward.terms.{i}.kwargs")
                except ValueError as err:
                    raise ConfigError(str(err)) from None


def _check_logging(cfg: ExperimentConfig) -> None:
    """logging.wandb needs the wandb package (the `wandb` extra); without logging.wandb it is
    never imported."""
    if cfg.logging.wandb is not None:
        from loop_ray.system.run.wandb_logger import import_wandb

        import_wandb()


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
        from loop_ray.diffusion.ddim.stable_diffusion import resolve_model_folder

        try:
            resolve_model_folder(path, cfg.model.revision)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.path: {err}") from None
    if kind in ("sd3", "flux") and path:
        _check_flow_model(cfg)


def _check_flow_model(cfg: ExperimentConfig) -> None:
    """An SD3 / FLUX folder: the pipeline class its model_index.json names, every component folder and a
    flow-matching scheduler. A Hugging Face id is checked when the driver's cache holds it."""
    from loop_ray.diffusion.flow.loading import check_flow_folder, resolve_flow_folder

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
    _check_logging(cfg)
    _check_model(cfg)
    _check_learner(cfg)
    return train_set, val_set
