"""Typed configuration of one loop-ray experiment.

One YAML file describes one experiment; it may name a base config (`base: toy.yaml`, a path
relative to the file) whose keys it overrides. `load_config(path, overrides)` reads it and its
bases, applies the algorithm preset (see `loop_ray.algorithms.PRESETS`), applies `--set a.b.c=value` overrides and
validates the result. Every error names the key path and the file it came from.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loop_ray.algorithms import CONTROLS, ESTIMATORS, PRESETS, STEP_WEIGHTS
from loop_ray.diffusion.kinds import (
    FLOW_MODEL_KINDS,
    GROUP_NOISE,
    MODEL_KINDS,
    SAMPLE_DTYPES,
    SDE_KINDS,
    TRAINABLE,
    WINDOW_PLACEMENTS,
)

# each choice list is defined beside the code that uses it; the config's fields name these
DTYPES = tuple(SAMPLE_DTYPES)
PRESET_NAMES = tuple(PRESETS)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key path and the file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The denoiser stack. `kind`: `toy` (the embedded model), `stable_diffusion` (diffusers folder
    or a Hugging Face id from the local cache) or `tiny_sd` (a randomly initialised SD-shaped stack,
    for tests and benchmarks); the flow-matching models `sd3` (SD3 / SD3.5), `flux` (FLUX.1) and their
    random tiny stacks `tiny_sd3`, `tiny_flux`."""

    kind: Literal[MODEL_KINDS] = "toy"
    path: str | None = None  # None with kind=toy means the committed embedded checkpoint
    revision: str | None = None
    lora_rank: int = Field(0, ge=0)  # 0 = train the full UNet; >0 = peft LoRA adapters of this rank
    lora_alpha: float | None = None  # None = lora_rank
    sample_dtype: Literal[DTYPES] = "fp32"  # autocast dtype while sampling
    # which parameters train (loop_ray.diffusion.trainable): all, only the text cross-attention, or
    # only a per-channel gain on each cross-attention output (condition_gain);
    # `freeze` lists parameter-name prefixes frozen on top (e.g. [conv_out, conv_norm_out])
    trainable: Literal[TRAINABLE] = "all"
    freeze: list[str] = Field(default_factory=list)
    seed: int = 0  # init seed of kind=tiny_sd

    # --- flow-matching models (kind sd3 / flux / tiny_sd3 / tiny_flux; loop_ray/diffusion/flow/) ---
    max_sequence_length: int | None = Field(None, ge=1)  # T5 tokens; None = the pipeline's (SD3 256, FLUX 512)


class SamplingConfig(_Section):
    num_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(2.0, ge=0.0)
    eta: float = Field(1.0, ge=0.0)
    k: int = Field(4, ge=1)  # K trajectories per prompt
    prompts_per_iteration: int = Field(16, ge=1)  # prompts per iteration (each K samples)
    batch_size: int = Field(16, ge=1)  # samples per sampler forward chunk
    # Which steps are stochastic and trained (loop_ray.diffusion.windows): all (null, the paper), a
    # fixed list `sde_steps`, or a window of `sde_window` consecutive steps placed per iteration:
    # fixed at `sde_window_start`, random, or sliding from `sde_window_start` to `sde_window_end`
    # over the run (MixGRPO). Steps outside run DDIM with eta = 0 and are never trained.
    sde_steps: list[int] | None = None
    sde_window: int | None = Field(None, ge=1)
    sde_window_placement: Literal[WINDOW_PLACEMENTS] = "fixed"
    sde_window_start: int = Field(0, ge=0)
    sde_window_end: int | None = Field(None, ge=1)  # exclusive; null = num_steps
    # How the K samples of a group share noise (loop_ray.diffusion.policy_base): independent (the
    # paper), branch (shared initial noise and deterministic prefix, parting at the first stochastic
    # step), shared (every step stochastic, only the sde steps' noise differs within a group),
    # antithetic (as shared, the K samples in mirrored pairs: the second draws minus the first's noise)
    group_noise: Literal[GROUP_NOISE] = "independent"

    # --- flow-matching models (loop_ray/diffusion/flow/logprob.py); eta is the DDIM models' ---
    flow_sde: Literal[SDE_KINDS] = "sde"  # Flow-GRPO's SDE step, or Flow-CPS's coefficient-preserving one
    flow_noise_level: float = Field(0.7, ge=0.0)  # a: sigma_s = a sqrt(s / (1 - s)) (sde), sin(a pi / 2) (cps)
    flow_resolution: int | None = Field(None, ge=8)  # image side in pixels; None = the model's default


class PromptsConfig(_Section):
    """Prompt sources: `toy:train`, `toy:val`, `toy:pretrain`, `compbench:color_val`,
    `ddpo:simple_animals`, or a path to a text file with one prompt a line."""

    train: str = "toy:train"
    val: str = "toy:val"


class RuntimeEnvConfig(_Section):
    """A Ray runtime environment for reward actors (Ray's `runtime_env`), so a reward's
    dependencies live only there: `pip` packages installed into a virtualenv on top of the node's
    Python, `py_modules` (local package folders or .whl/.zip files, uploaded by the driver, or
    URIs), a `working_dir` (local folder or URI; it replaces the job's working_dir in these
    actors), `env_vars` (written to the run's config.yaml: never put secrets here), or a container
    `image_uri` (which Ray allows only with `env_vars`)."""

    pip: list[str] | None = None
    py_modules: list[str] | None = None
    working_dir: str | None = None
    excludes: list[str] | None = None  # paths left out of the uploaded working_dir / py_modules
    env_vars: dict[str, str] | None = None
    image_uri: str | None = None

    @model_validator(mode="after")
    def _check_image_uri(self) -> RuntimeEnvConfig:
        if self.image_uri is not None:
            others = [k for k in ("pip", "py_modules", "working_dir", "excludes") if getattr(self, k) is not None]
            if others:
                raise ValueError(f"image_uri can be combined only with env_vars in a Ray runtime_env, not {others}")
        return self

    def to_ray(self) -> dict[str, Any]:
        """The runtime_env dict Ray takes (local paths not yet uploaded)."""
        return self.model_dump(mode="json", exclude_none=True)


class RewardTerm(_Section):
    """One term of the weighted reward sum. With `runtime_env`, the term is scored by reward actors
    of its own started in that environment (terms with equal runtime_envs share them); the other
    terms are scored together by the shared reward actors."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict)
    runtime_env: RuntimeEnvConfig | None = None


class RewardConfig(_Section):
    terms: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="toy_binding")], min_length=1)
    batch_size: int = Field(32, ge=1)  # images per reward call
    runtime_env: RuntimeEnvConfig | None = None  # of the shared reward actors (terms without their own)


class AlgorithmConfig(_Section):
    preset: Literal[PRESET_NAMES] | None = "loop"
    advantage: Literal[ESTIMATORS] = "leave_one_out"
    importance_sampling: bool = True
    clip_eps: float = Field(1e-4, gt=0.0)
    inner_epochs: int = Field(1, ge=1)
    timestep_fraction: float = Field(1.0, gt=0.0, le=1.0)
    adv_clip_max: float = Field(5.0, gt=0.0)
    skip_first_steps: int = Field(0, ge=0)  # DDIM steps at the start left out of the loss
    skip_last_steps: int = Field(0, ge=0)  # DDIM steps at the end left out of the loss
    stat_tracker_buffer: int = Field(16, ge=1)
    stat_tracker_min_count: int = Field(16, ge=1)
    std_eps: float = Field(1e-6, gt=0.0)  # group_std / stat_tracker denominator epsilon
    # The null for every learning claim: `shuffle` permutes the advantages across all samples of an
    # iteration (same magnitudes, no information about which image was better)
    control: Literal[CONTROLS] = "none"
    # Weight beta of a KL penalty to the reference policy (the weights the learner starts from),
    # added to the loss of every trained step: beta * KL(p_ref(x_{t-1}|x_t,c) || p_theta(.|x_t,c)),
    # averaged over latent dims like the log-probs (DPOK, Flow-GRPO). 0 = none (the paper's LOOP).
    kl_beta: float = Field(0.0, ge=0.0)
    # Per-step loss weight (loop_ray.algorithms.step_loss_weights): none (the paper), sigma (the
    # step's std: cancels the 1/sigma of the log-prob gradient), output (sigma / |d mu / d output|)
    step_weight: Literal[STEP_WEIGHTS] = "none"
    # What the learner fits (loop_ray.forward_process): `policy_gradient` (the clipped-IS / REINFORCE
    # loss on stored log-probs: LOOP and the paper's methods), or a forward-process objective on
    # clean samples: `nft` (DiffusionNFT) or `rwr` (reward-weighted regression). Forward-process
    # objectives train on the sampler's schedule steps (timestep_fraction, skip_*_steps apply);
    # with kl_beta > 0 they add kl_beta * mean_d (o_theta - o_ref)^2, the authors' KL term.
    objective: Literal["policy_gradient", "nft", "rwr"] = "policy_gradient"
    nft_beta: float = Field(1.0, gt=0.0)  # beta of the implicit policies (authors: 1.0; 0.1 for OCR / multi-reward)
    nft_adaptive_weight: bool = True  # divide each sample's x_0 error by its detached mean |error|
    # the old (sampling) policy's EMA decay after optimizer step i: min(rate (i - flat), max), 0 before
    # `flat` (authors' decay_type 1: 0.001, 0.5, 0; decay_type 2: 0.0075, 0.999, 75)
    nft_decay_rate: float = Field(0.001, ge=0.0)
    nft_decay_max: float = Field(0.5, ge=0.0, lt=1.0)
    nft_decay_flat: int = Field(0, ge=0)
    rwr_temperature: float = Field(1.0, gt=0.0)  # tau of the RWR weights exp(A / tau)


OPTIMIZERS = ("adamw", "sgd")  # loop_ray.training.deepspeed_engine.build_optimizer


class LearnerConfig(_Section):
    num_workers: int = Field(1, ge=1)
    num_cpus_per_worker: float = Field(1.0, ge=0.0)
    num_gpus_per_worker: float = Field(0.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources (node-type placement)
    # adamw (the paper) or sgd (plain SGD with momentum `sgd_momentum`: the update is the summed
    # gradient, the direction `loop-ray diagnose --align` measures, where Adam rescales each weight)
    optimizer: Literal[OPTIMIZERS] = "adamw"
    sgd_momentum: float = Field(0.0, ge=0.0, lt=1.0)
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal[DTYPES] = "fp32"
    minibatch_size: int = Field(4, ge=1)  # samples per worker per forward
    minibatches_per_step: int = Field(1, ge=1)  # optimizer step every N minibatches
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class ClusterConfig(_Section):
    address: str | None = None  # None: RAY_ADDRESS or a local single-node Ray
    num_samplers: int = Field(1, ge=1)
    sampler_cpus: float = Field(1.0, ge=0.0)
    sampler_gpus: float = Field(0.0, ge=0.0)
    sampler_resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources, e.g. {sampler_node: 1}
    num_reward_workers: int = Field(1, ge=1)
    reward_cpus: float = Field(1.0, ge=0.0)
    reward_gpus: float = Field(0.0, ge=0.0)
    reward_resources: dict[str, float] = Field(default_factory=dict)
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = Field(0, ge=0)
    torch_threads: int = Field(1, ge=1)  # torch threads in every process and actor
    max_restarts: int = Field(3, ge=0)  # Ray restarts of a crashed sampler / reward actor
    call_retries: int = Field(2, ge=0)  # a lost sampler or reward call sent again (same seeds / images)
    # Deadlines (seconds): a sampler / reward / learner call past call_timeout_s counts as failed
    # (sampler and reward calls are sent again); start-up past startup_timeout_s fails naming the
    # pending actors; an actor that does not answer a ping within ping_timeout_s while Ray lists it
    # as not ALIVE is replaced. Generous defaults: raise call_timeout_s for big models.
    call_timeout_s: float = Field(3600.0, gt=0)
    startup_timeout_s: float = Field(1800.0, gt=0)
    ping_timeout_s: float = Field(60.0, gt=0)
    # a learner group that lost a rank is rebuilt and restored from the newest good checkpoint
    # this many times per run (needs checkpoint.every)
    learner_restarts: int = Field(1, ge=0)


class EvalConfig(_Section):
    every: int = Field(0, ge=0)  # iterations between evaluations; 0 = before and after only
    images_per_prompt: int = Field(10, ge=1)
    max_prompts: int | None = Field(None, ge=1)
    seed: int = 1234
    batch_size: int = Field(32, ge=1)
    grid_prompts: int = Field(8, ge=0)  # prompts shown in the eval image grid


class WandbConfig(_Section):
    """Weights & Biases logging beside TensorBoard (needs the `wandb` extra)."""

    project: str
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"


class LoggingConfig(_Section):
    tensorboard: bool = True
    progress_bar: bool = True
    wandb: WandbConfig | None = None  # None: no W&B


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0)  # iterations between checkpoints; 0 = only at the end
    keep_last: int = Field(2, ge=1)


class ExperimentConfig(_Section):
    name: str = "experiment"
    seed: int = 0
    iterations: int = Field(10, ge=0)
    output_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> ExperimentConfig:
        algo, k = self.algorithm, self.sampling.k
        if algo.advantage in ("leave_one_out", "prompt_mean", "group_std") and k < 2:
            raise ValueError(
                f"sampling.k={k}: algorithm.advantage={algo.advantage!r} compares the K samples of a "
                "prompt and needs sampling.k >= 2"
            )
        if algo.objective != "policy_gradient" and algo.importance_sampling:
            raise ValueError(
                f"algorithm.objective={algo.objective!r} trains on clean samples without log-probs: "
                "set algorithm.importance_sampling=false"
            )
        if self.sampling.group_noise == "antithetic" and k % 2:
            raise ValueError(
                f"sampling.group_noise='antithetic' forms mirrored pairs within a group: sampling.k={k} must be even"
            )
        if algo.objective != "policy_gradient" and self.sampling.group_noise != "independent":
            raise ValueError(
                f"sampling.group_noise={self.sampling.group_noise!r}: algorithm.objective={algo.objective!r} "
                "learns from the clean samples alone, and shared noise makes a group's samples alike "
                "(identical under deterministic sampling); use sampling.group_noise=independent"
            )
        if algo.objective != "policy_gradient" and self.learner.zero_stage == 3:
            raise ValueError(
                f"algorithm.objective={algo.objective!r}: the old policy swaps weights in place, which "
                "ZeRO stage 3's partitioned parameters do not allow; use learner.zero_stage <= 2"
            )
        if algo.advantage == "batch_std" and k < 2:
            raise ValueError(f"sampling.k={k}: algorithm.advantage='batch_std' needs sampling.k >= 2")
        if not algo.importance_sampling and algo.inner_epochs != 1 and algo.objective == "policy_gradient":
            raise ValueError(
                f"algorithm.inner_epochs={algo.inner_epochs}: without importance sampling the objective "
                "is on-policy, so only one epoch over a batch is valid"
            )
        total = self.sampling.prompts_per_iteration * k
        workers = self.learner.num_workers
        if total % workers:
            raise ValueError(
                f"learner.num_workers={workers}: the batch of sampling.prompts_per_iteration x sampling.k "
                f"= {total} samples is not divisible by it"
            )
        shard = total // workers
        per_step = self.learner.minibatch_size * self.learner.minibatches_per_step
        if shard % per_step:
            raise ValueError(
                f"learner.minibatch_size={self.learner.minibatch_size} x learner.minibatches_per_step="
                f"{self.learner.minibatches_per_step}: does not divide the {shard} samples each learner "
                "worker receives per iteration"
            )
        from loop_ray.diffusion.windows import check_sde_config

        check_sde_config(self.sampling, algo.skip_first_steps, algo.skip_last_steps)
        if self.cluster.mode == "sync" and self.cluster.max_staleness != 0:
            raise ValueError("cluster.max_staleness must be 0 in cluster.mode=sync")
        if self.model.lora_rank > 0 and (self.model.trainable != "all" or self.model.freeze):
            raise ValueError(
                "model.trainable / model.freeze choose parameters of the full network; with "
                f"model.lora_rank={self.model.lora_rank} only the LoRA adapters train"
            )
        if self.model.kind == "stable_diffusion" and not self.model.path:
            raise ValueError("model.path is required with model.kind=stable_diffusion")
        return self

    @model_validator(mode="after")
    def _check_flow(self) -> ExperimentConfig:
        """Flow-matching models: a path for the real ones, a CPS noise level within [0, 1]."""
        kind, sampling = self.model.kind, self.sampling
        if kind in ("sd3", "flux") and not self.model.path:
            raise ValueError(f"model.path is required with model.kind={kind} (a diffusers folder or a cached id)")
        if sampling.flow_sde == "cps" and sampling.flow_noise_level > 1:
            raise ValueError(
                f"sampling.flow_noise_level={sampling.flow_noise_level}: with sampling.flow_sde=cps the fresh "
                "noise share is sin(a pi / 2), so a must lie in [0, 1]"
            )
        last = sampling.num_steps - 1
        if kind in FLOW_MODEL_KINDS and sampling.flow_sde == "cps" and _reaches(sampling, last):
            raise ValueError(
                f"sampling.sde_steps / sde_window: with sampling.flow_sde=cps the last step ({last}) is deterministic "
                "(s' = 0), so a window that can reach it would train fewer steps in some iterations; keep the "
                f"stochastic steps below it (sde_window_end <= {last})"
            )
        return self


def _reaches(sampling, step: int) -> bool:
    """Whether a configured set of stochastic steps (sde_steps or a window; not all steps) can include `step`."""
    if sampling.sde_steps is not None:
        return step in sampling.sde_steps
    if sampling.sde_window is None:
        return False
    if sampling.sde_window_placement == "fixed":
        return sampling.sde_window_start + sampling.sde_window > step
    end = sampling.sde_window_end if sampling.sde_window_end is not None else sampling.num_steps
    return end > step


# ---------------------------------------------------------------------------------------------
# Loading: YAML -> preset -> overrides -> validation


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 1e-4, true, null, [1, 2], 'text'."""
    return yaml.safe_load(text) if text.strip() else ""


def apply_override(data: dict, dotted: str, value: Any, source: str = "--set") -> None:
    """Set `data[a][b][c] = value` for `dotted = "a.b.c"`; list items are addressed by index."""
    keys = dotted.split(".")
    node: Any = data
    default: Any = ExperimentConfig().model_dump(mode="json")
    for i, key in enumerate(keys[:-1]):
        path = ".".join(keys[: i + 1])
        if isinstance(node, list):
            index = _list_index(node, key, path, source)
            node = node[index]
            default = default[index] if isinstance(default, list) and index < len(default) else None
            continue
        default = default.get(key) if isinstance(default, dict) else None
        if key not in node or node[key] is None:
            # a list (reward.terms) is copied from the defaults so its items can be addressed by
            # index; a missing section starts empty so a preset can still fill it
            node[key] = copy.deepcopy(default) if isinstance(default, list) else {}
        node = node[key]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{source}: {path} is a value, not a section; cannot set {dotted}")
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted, source)] = value
    else:
        node[last] = value


def _list_index(node: list, key: str, path: str, source: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"{source}: {path}: {key!r} is not an index of a list of {len(node)} items")
    return int(key)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. algorithm.clip_eps=1e-4")
        key, _, raw = item.partition("=")
        out[key.strip()] = _parse_value(raw)
    return out


def _apply_preset(data: dict, source: str) -> None:
    """Fill the preset's values where the file does not set them (the file wins)."""
    preset = (data.get("algorithm") or {}).get("preset", AlgorithmConfig.model_fields["preset"].default)
    if preset is None:
        return
    if preset not in PRESETS:
        raise ConfigError(f"{source}: algorithm.preset: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    for dotted, value in PRESETS[preset].items():
        section, key = dotted.split(".")
        sect = data.setdefault(section, {}) or {}
        data[section] = sect
        sect.setdefault(key, value)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def config_from_dict(data: dict, source: str = "<dict>", overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    data = copy.deepcopy(data) if data else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        apply_override(data, dotted, value, source=f"{source} (--set {dotted})")
    _apply_preset(data, source)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


BASE_KEY = "base"  # a config file's base config: a path relative to the file, whose keys it overrides


def merge_config_data(base: dict, override: dict) -> dict:
    """`override` on top of `base`: mappings merge key by key, at every depth; any other value (a list
    included, e.g. reward.terms) replaces the base's. Neither input is changed."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config_data(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, named_by: str | None) -> dict:
    if not path.is_file():
        if named_by is not None:
            raise ConfigError(f"{named_by}: base config not found: {path}")
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def read_config_data(path: str | Path) -> dict:
    """The YAML mapping of a config file with its `base:` chain resolved: the base's data (itself
    resolved the same way), the file's keys merged on top (merge_config_data), without the `base`
    key. A missing base or a cycle (a file that is its own base, at any depth) is a one-line
    ConfigError naming the files."""
    chain: list[Path] = []  # resolved, to find a cycle; `shown` as the files name each other
    shown: list[str] = []
    path, named_by = Path(path), None
    layers: list[dict] = []
    while True:
        resolved = path.resolve()
        if resolved in chain:
            raise ConfigError(f"{named_by}: base configs form a cycle: {' -> '.join([*shown, str(path)])}")
        chain.append(resolved)
        shown.append(str(path))
        data = _read_yaml(path, named_by)
        layers.append(data)
        base = data.pop(BASE_KEY, None)
        if base is None:
            break
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: base: expected a path to another config file, got {base!r}")
        named_by, path = str(path), path.parent / base
    merged: dict = {}
    for data in reversed(layers):
        merged = merge_config_data(merged, data)
    return merged


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file (with its `base:` configs, read_config_data), apply its preset and
    `--set` overrides, validate."""
    data = read_config_data(path)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return config_from_dict(data, source=str(path), overrides=overrides)


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
