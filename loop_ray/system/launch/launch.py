"""Start and stop the three roles with the resources the config gives each (independent scaling):
`cluster.num_samplers` samplers, `cluster.num_reward_workers` reward actors and
`learner.num_workers` learner workers, each with its CPUs, GPUs (fractions allowed) and custom
resources. Before anything starts, the cluster is checked to have room for every actor.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from loop_ray.config import ConfigError, ExperimentConfig
from loop_ray.system.launch.cluster import actor_options, role_resources
from loop_ray.system.roles.actors import ActorSet
from loop_ray.system.roles.learner import LearnerGroup
from loop_ray.system.roles.reward_server import RemoteRewardActor, RewardPool
from loop_ray.system.roles.sampler import RemoteSampler


def check_capacity(cfg: ExperimentConfig) -> None:
    """Fail with the config keys to change when the cluster cannot hold every actor at once
    (otherwise Ray would leave the missing actors pending forever)."""
    total = ray.cluster_resources()
    res = role_resources(cfg)
    counts = {"sampler": cfg.cluster.num_samplers, "reward": cfg.cluster.num_reward_workers,
              "learner": cfg.learner.num_workers}
    keys = {
        "sampler": ("cluster.sampler_cpus", "cluster.sampler_gpus", "cluster.sampler_resources"),
        "reward": ("cluster.reward_cpus", "cluster.reward_gpus", "cluster.reward_resources"),
        "learner": ("learner.num_cpus_per_worker", "learner.num_gpus_per_worker", "learner.resources"),
    }
    demand: dict[str, float] = {}
    for role, r in res.items():
        demand["CPU"] = demand.get("CPU", 0.0) + counts[role] * r.num_cpus
        demand["GPU"] = demand.get("GPU", 0.0) + counts[role] * r.num_gpus
        for name, amount in r.resources.items():
            demand[name] = demand.get(name, 0.0) + counts[role] * amount
    for name, amount in demand.items():
        have = total.get(name, 0.0)
        if amount > have + 1e-9:
            involved = [
                keys[role][0 if name == "CPU" else 1 if name == "GPU" else 2]
                for role, r in res.items()
                if (r.num_cpus if name == "CPU" else r.num_gpus if name == "GPU" else r.resources.get(name, 0))
            ]
            raise ConfigError(
                f"the Ray cluster has {have:g} {name} but the roles ask for {amount:g} "
                f"({', '.join(involved)} times the actor counts); lower them or add nodes"
            )


@dataclass
class System:
    samplers: ActorSet
    reward_pool: RewardPool
    learner: LearnerGroup

    @classmethod
    def start(cls, cfg: ExperimentConfig) -> System:
        check_capacity(cfg)
        cfg_dict = cfg.model_dump(mode="json")
        res = role_resources(cfg)
        threads, restarts = cfg.cluster.torch_threads, cfg.cluster.max_restarts

        def new_sampler(rank: int):
            opts = actor_options(res["sampler"], threads, max_restarts=restarts)
            return RemoteSampler.options(**opts).remote(cfg_dict, rank)

        def new_reward_actor(rank: int):
            opts = actor_options(res["reward"], threads, max_restarts=restarts)
            return RemoteRewardActor.options(**opts).remote(cfg_dict, rank)

        samplers = ActorSet("sampler", [new_sampler(i) for i in range(cfg.cluster.num_samplers)], new_sampler)
        rewards = ActorSet(
            "reward actor", [new_reward_actor(i) for i in range(cfg.cluster.num_reward_workers)], new_reward_actor
        )
        learner = LearnerGroup(cfg)
        ray.get([a.ping.remote() for a in [*samplers, *rewards]])  # surface construction errors now
        return cls(samplers, RewardPool(rewards), learner)

    def shutdown(self) -> None:
        self.learner.shutdown()
        self.samplers.kill_all()
        self.reward_pool.actors.kill_all()
