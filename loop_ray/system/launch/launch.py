"""Start and stop the three roles with the resources the config gives each (independent scaling):
`cluster.num_samplers` samplers, `cluster.num_reward_workers` reward actors per reward term group
(the shared terms, and each distinct term runtime_env) and `learner.num_workers` learner workers,
each with its CPUs, GPUs (fractions allowed) and custom resources. Before anything starts, the
cluster is checked to have room for every actor (in its free resources); start-up has a deadline
(`cluster.startup_timeout_s`), past which it fails naming the pending actors and the free resources; a reward actor that cannot start (its runtime_env
fails to install, its reward fails to import or build) is reported as a ConfigError naming its terms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from loop_ray.config import ConfigError, ExperimentConfig
from loop_ray.rewards.composite import TermGroup, term_groups
from loop_ray.rewards.http import token_env_values
from loop_ray.system.launch.cluster import actor_counts, actor_options, role_resources, upload_runtime_env
from loop_ray.system.roles.actors import ActorSet
from loop_ray.system.roles.learner import LearnerGroup
from loop_ray.system.roles.reward_server import RemoteRewardActor, RewardGroup, RewardPool
from loop_ray.system.roles.sampler import RemoteSampler
from loop_ray.system.roles.waits import CallTimeoutError, wait_for


def error_summary(err: BaseException, limit: int = 300) -> str:
    """The line of a Ray error that says what went wrong (the last 'SomeError: message' line of
    the remote traceback), else its first line; at most `limit` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = [line for line in lines if ": " in line and line.split(": ", 1)[0].rsplit(".", 1)[-1].endswith(
        ("Error", "Exception"))]
    text = found[-1] if found else (lines[0] if lines else type(err).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_capacity(cfg: ExperimentConfig, wait_s: float = 30.0) -> None:
    """Fail with the config keys to change when the cluster cannot hold every actor at once
    (otherwise Ray would leave the missing actors pending forever): when its total resources fall
    short, at once; when only its available ones do (held by other actors), after waiting up to
    `wait_s` seconds for actors being stopped to free them."""
    total = ray.cluster_resources()
    res = role_resources(cfg)
    counts = actor_counts(cfg)
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
    deadline = time.monotonic() + wait_s
    while True:
        available = ray.available_resources()
        short = {name: amount for name, amount in demand.items() if amount > available.get(name, 0.0) + 1e-9}
        if not short:
            return
        if time.monotonic() >= deadline:
            name, amount = next(iter(short.items()))
            raise ConfigError(
                f"the Ray cluster has {available.get(name, 0.0):g} of its {total.get(name, 0.0):g} {name} free "
                f"(the rest held by other actors) but the roles ask for {amount:g}; "
                f"available now: {_resources(available)}"
            )
        time.sleep(0.2)


def _resources(res: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if not k.startswith(("node:", "memory",
                                                                                          "object_store")))


def wait_started(actors, what: str, timeout_s: float) -> None:
    """Wait for `actors` to answer a ping within the start-up deadline; past it, a
    CallTimeoutError naming each pending actor's state and node and the cluster's free resources."""
    actors = list(actors)
    try:
        wait_for([a.ping.remote() for a in actors], timeout_s, what, actors)
    except CallTimeoutError as err:
        raise CallTimeoutError(f"{err}; resources available: {_resources(ray.available_resources())}") from None


def _start_reward_group(cfg: ExperimentConfig, cfg_dict: dict, group: TermGroup, res, threads: int,
                        restarts: int) -> RewardGroup:
    """The reward actors of one term group, each started in the group's runtime_env (its local
    folders uploaded for every actor started, replacements included)."""
    terms = list(group.terms)
    environ = token_env_values([cfg.reward.terms[i] for i in terms])
    label = "reward actor" if group.shared else f"reward actor for {group.describe(cfg.reward)}"

    def new_actor(rank: int):
        user_env = upload_runtime_env(group.runtime_env.to_ray()) if group.runtime_env is not None else None
        opts = actor_options(res, threads, max_restarts=restarts, runtime_env=user_env)
        return RemoteRewardActor.options(**opts).remote(cfg_dict, rank, terms, environ)

    actors = [new_actor(i) for i in range(cfg.cluster.num_reward_workers)]
    return RewardGroup(ActorSet(label, actors, new_actor, cfg.cluster.ping_timeout_s, cfg.cluster.startup_timeout_s))


def start_reward_pool(cfg: ExperimentConfig, cfg_dict: dict | None = None) -> RewardPool:
    """Start the reward actors of every term group (without waiting for them: see
    `wait_for_reward_actors`)."""
    cfg_dict = cfg.model_dump(mode="json") if cfg_dict is None else cfg_dict
    res = role_resources(cfg)["reward"]
    threads, restarts = cfg.cluster.torch_threads, cfg.cluster.max_restarts
    groups: list[RewardGroup] = []
    try:
        for group in term_groups(cfg.reward):
            groups.append(_start_reward_group(cfg, cfg_dict, group, res, threads, restarts))
    except BaseException:
        for g in groups:
            g.actors.kill_all()
        raise
    return RewardPool(groups)


def wait_for_reward_actors(cfg: ExperimentConfig, pool: RewardPool) -> None:
    """Wait for every reward actor to answer; one that failed to start is a ConfigError naming its
    terms and what went wrong (a runtime_env that did not install, a reward that did not build)."""
    for group, rewards in zip(term_groups(cfg.reward), pool.groups):
        try:
            wait_started(rewards.actors, f"{group.describe(cfg.reward)}: reward actors starting",
                         cfg.cluster.startup_timeout_s)
        except CallTimeoutError:
            raise
        except ray.exceptions.RayError as err:
            env = " in its runtime_env" if not group.shared else (
                " in reward.runtime_env" if cfg.reward.runtime_env is not None else "")
            raise ConfigError(
                f"{group.describe(cfg.reward)}: the reward actor did not start{env}: {error_summary(err)}"
            ) from None


@dataclass
class System:
    samplers: ActorSet
    reward_pool: RewardPool
    learner: LearnerGroup

    @classmethod
    def start(cls, cfg: ExperimentConfig) -> System:
        """Start every role; when any actor fails to start, the ones already started are stopped."""
        check_capacity(cfg)
        cfg_dict = cfg.model_dump(mode="json")
        res = role_resources(cfg)
        threads, restarts = cfg.cluster.torch_threads, cfg.cluster.max_restarts

        def new_sampler(rank: int):
            opts = actor_options(res["sampler"], threads, max_restarts=restarts)
            return RemoteSampler.options(**opts).remote(cfg_dict, rank)

        started: list = []  # what to stop when something fails to start
        try:
            samplers = ActorSet("sampler", [new_sampler(i) for i in range(cfg.cluster.num_samplers)], new_sampler,
                                cfg.cluster.ping_timeout_s, cfg.cluster.startup_timeout_s)
            started.append(samplers)
            pool = start_reward_pool(cfg, cfg_dict)
            started.append(pool)
            learner = LearnerGroup(cfg)
            started.append(learner)
            wait_for_reward_actors(cfg, pool)
            wait_started(samplers, "samplers starting", cfg.cluster.startup_timeout_s)  # construction errors now
        except BaseException:
            for part in started:
                if isinstance(part, LearnerGroup):
                    part.shutdown()
                else:
                    part.kill_all()
            raise
        return cls(samplers, pool, learner)

    def shutdown(self) -> None:
        self.learner.shutdown()
        self.samplers.kill_all()
        self.reward_pool.kill_all()
