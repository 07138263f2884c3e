"""Where the system runs: joining or starting Ray, and the resources and environment of each role.

Address resolution: `--address`, then `cfg.cluster.address`, then RAY_ADDRESS; with none of them
the driver starts a single-node local Ray (debug mode, dashboard off). A Ray already initialised in
this process (tests) is used as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

from loop_ray.config import ExperimentConfig


@dataclass(frozen=True)
class RoleResources:
    """Ray resources of one actor of a role."""

    num_cpus: float
    num_gpus: float
    resources: dict[str, float]

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


def role_resources(cfg: ExperimentConfig) -> dict[str, RoleResources]:
    c, lrn = cfg.cluster, cfg.learner
    return {
        "sampler": RoleResources(c.sampler_cpus, c.sampler_gpus, dict(c.sampler_resources)),
        "reward": RoleResources(c.reward_cpus, c.reward_gpus, dict(c.reward_resources)),
        "learner": RoleResources(lrn.num_cpus_per_worker, lrn.num_gpus_per_worker, dict(lrn.resources)),
    }


def actor_env(torch_threads: int, device: str) -> dict[str, str]:
    """Environment of an actor process. Ray sets OMP_NUM_THREADS to the actor's CPUs; the
    configured thread count replaces it, and DeepSpeed is told which accelerator to use."""
    n = str(torch_threads)
    return {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cuda" if device == "cuda" else "cpu",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no weight-loading bars from every actor
    }


def actor_options(res: RoleResources, torch_threads: int, *, max_restarts: int = 0, name: str | None = None,
                  runtime_env: dict | None = None) -> dict:
    """Ray options of one actor. `runtime_env` (a user's, for reward actors) is merged with the
    actor environment: its env_vars win over ours, its other fields are passed as they are."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**actor_env(torch_threads, res.device), **env.get("env_vars", {})}
    opts = {
        "num_cpus": res.num_cpus,
        "num_gpus": res.num_gpus,
        "runtime_env": env,
        "max_restarts": max_restarts,
        "max_task_retries": max_restarts,
    }
    if res.resources:
        opts["resources"] = dict(res.resources)
    if name:
        opts["name"] = name
    return opts


def actor_counts(cfg: ExperimentConfig) -> dict[str, int]:
    """Actors per role: cluster.num_reward_workers reward actors for every reward term group (the
    shared one and one per distinct runtime_env)."""
    from loop_ray.rewards.composite import term_groups

    return {"sampler": cfg.cluster.num_samplers,
            "reward": cfg.cluster.num_reward_workers * len(term_groups(cfg.reward)),
            "learner": cfg.learner.num_workers}


def demanded_cpus(cfg: ExperimentConfig) -> float:
    r, n = role_resources(cfg), actor_counts(cfg)
    return sum(n[role] * r[role].num_cpus for role in n)


def upload_runtime_env(runtime_env: dict) -> dict:
    """A runtime_env whose local working_dir / py_modules paths are uploaded to the cluster and
    replaced by their package URIs. Ray does this itself only for the job's runtime_env (ray.init);
    an actor's must name URIs, so the driver uploads them the same way (content-addressed: an
    unchanged folder is not sent twice). Called for every actor started, so a package the cluster
    dropped after its last actor ended is sent again."""
    if not runtime_env.get("working_dir") and not runtime_env.get("py_modules"):
        return runtime_env
    import inspect
    import logging
    import tempfile

    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    out = dict(runtime_env)
    quiet = logging.getLogger("loop_ray.runtime_env")
    with tempfile.TemporaryDirectory(prefix="loop_ray_pkg_") as scratch:
        for upload in (upload_py_modules_if_needed, upload_working_dir_if_needed):
            kwargs = {"scratch_dir": scratch, "logger": quiet}
            if "include_gitignore" in inspect.signature(upload).parameters:
                kwargs["include_gitignore"] = True
            out = upload(out, **kwargs)
    out.pop("excludes", None)  # applied by the upload
    return out


def resolve_address(cfg: ExperimentConfig, address: str | None) -> str | None:
    return address or cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None


def connect(cfg: ExperimentConfig, address: str | None = None) -> bool:
    """Join the configured cluster or start a local one. Returns True when this call started Ray
    (so the caller shuts it down at the end)."""
    if ray.is_initialized():
        return False
    address = resolve_address(cfg, address)
    env = {"env_vars": actor_env(cfg.cluster.torch_threads, "cpu")}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return True
    # Local debug mode: logical CPUs are at least what the roles ask for, so every actor fits;
    # in synchronous mode the roles take turns, so the oversubscription is on paper only.
    num_cpus = max(os.cpu_count() or 1, int(demanded_cpus(cfg) + 0.999))
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        runtime_env=env,
        log_to_driver=True,
    )
    return True
