"""Misbehaving samplers and reward actors for the fault tests: the project's actor classes with a
call that raises once (the actor stays alive) and/or a sleep in every work call (a busy, loaded
actor). Built as subclasses inside a function, so Ray ships them to the workers by value; the
tests put them in place of the real ones with monkeypatch (launch.RemoteSampler,
launch.RemoteRewardActor)."""

from __future__ import annotations

import time

from loop_ray.system.roles.reward_server import RemoteRewardActor, RewardActor
from loop_ray.system.roles.sampler import RemoteSampler, SamplerActor


def _remote_like(cls, real):
    """`cls` as a Ray actor class with the real class's class options (its concurrency groups)."""
    import ray

    options = {k: v for k, v in getattr(real, "_default_options", {}).items() if k == "concurrency_groups"}
    return ray.remote(**options)(cls) if options else ray.remote(cls)


def flaky_sampler(fail_on: int = 0, sleep_s: float = 0.0, init_sleep_s: float = 0.0):
    """A sampler whose `fail_on`-th generate call raises (0: none), whose every generate /
    generate_images call first sleeps `sleep_s` seconds, and that takes `init_sleep_s` seconds
    longer to start."""

    class FlakySampler(SamplerActor):
        calls = 0

        def __init__(self, *args, **kwargs):
            time.sleep(init_sleep_s)
            super().__init__(*args, **kwargs)

        def generate(self, *args, **kwargs):
            time.sleep(sleep_s)
            FlakySampler.calls += 1
            if FlakySampler.calls == fail_on:
                raise RuntimeError(f"injected fault in generate call {fail_on}")
            return super().generate(*args, **kwargs)

        def generate_images(self, *args, **kwargs):
            time.sleep(sleep_s)
            return super().generate_images(*args, **kwargs)

    return _remote_like(FlakySampler, RemoteSampler)


def flaky_reward_actor(fail_on: int = 0, sleep_s: float = 0.0):
    """A reward actor whose `fail_on`-th score call raises (0: none) and whose every score call
    first sleeps `sleep_s` seconds."""

    class FlakyRewardActor(RewardActor):
        calls = 0

        def score(self, chunk):
            time.sleep(sleep_s)
            FlakyRewardActor.calls += 1
            if FlakyRewardActor.calls == fail_on:
                raise RuntimeError(f"injected fault in score call {fail_on}")
            return super().score(chunk)

    return _remote_like(FlakyRewardActor, RemoteRewardActor)
