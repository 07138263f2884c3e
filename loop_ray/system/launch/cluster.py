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


def actor_options(res: RoleResources, torch_threads: int, *, max_restarts: int = 0, name: str | None = None) -> dict:
    opts = {
        "num_cpus": res.num_cpus,
        "num_gpus": res.num_gpus,
        "runtime_env": {"env_vars": actor_env(torch_threads, res.device)},
        "max_restarts": max_restarts,
        "max_task_retries": max_restarts,
    }
    if res.resources:
        opts["resources"] = dict(res.resources)
    if name:
        opts["name"] = name
    return opts


def demanded_cpus(cfg: ExperimentConfig) -> float:
    r = role_resources(cfg)
    return (
        cfg.cluster.num_samplers * r["sampler"].num_cpus
        + cfg.cluster.num_reward_workers * r["reward"].num_cpus
        + cfg.learner.num_workers * r["learner"].num_cpus
    )


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
