"""Bounded waits on a real local Ray: a late call is reported with its actor's node and state and
counts as failed; a failing call among slow ones raises at once; start-up past its deadline names
the pending actors and the free resources."""

import logging
import time

import pytest
import ray
from faulty_actors import flaky_sampler

from loop_ray.config import load_config
from loop_ray.system.launch import launch
from loop_ray.system.roles.actors import get_or_none
from loop_ray.system.roles.waits import CallTimeoutError, actor_state, wait_for

pytestmark = pytest.mark.slow


@ray.remote(num_cpus=0)
class Sleeper:
    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def fail(self):
        raise RuntimeError("this call fails")


def test_late_call_is_named_with_its_actor_and_counts_as_failed(ray_session, caplog):
    actor = Sleeper.remote()
    try:
        assert ray.get(actor.sleep.remote(0)) == 0
        ref = actor.sleep.remote(30)
        with caplog.at_level(logging.INFO, logger="loop_ray"):
            start = time.monotonic()
            with pytest.raises(CallTimeoutError, match=r"sleeper call: no answer within 1 s; 1 of 1 calls "
                                                         r"outstanding: call 0 on Sleeper \w+ on node \w+ \(pid \d+\): ALIVE"):
                wait_for([ref], 1.0, "sleeper call", [actor], report_every=0.3)
            assert time.monotonic() - start < 10
        assert "sleeper call: waited" in caplog.text  # the periodic report of what is outstanding
        assert get_or_none(actor.sleep.remote(30), "late call", 0.5, actor) is None
        assert actor_state(actor) == "ALIVE"
    finally:
        ray.kill(actor)


def test_a_failing_call_raises_without_waiting_for_the_slow_ones(ray_session):
    slow, failing = Sleeper.remote(), Sleeper.remote()
    try:
        start = time.monotonic()
        with pytest.raises(ray.exceptions.RayTaskError, match="this call fails"):
            wait_for([slow.sleep.remote(60), failing.fail.remote()], 120, "two calls")
        assert time.monotonic() - start < 30
    finally:
        ray.kill(slow)
        ray.kill(failing)


def test_start_up_past_its_deadline_names_the_pending_actors(ray_session):
    cfg = load_config("configs/debug.yaml", {})
    sampler = flaky_sampler(init_sleep_s=60).options(num_cpus=0.5).remote(cfg.model_dump(mode="json"), 0)
    try:
        start = time.monotonic()
        with pytest.raises(CallTimeoutError, match=r"samplers starting: no answer within 2 s; 1 of 1 calls "
                                                    r"outstanding: call 0 on \S+ \w+ on node .*; resources available: CPU"):
            launch.wait_started([sampler], "samplers starting", 2.0)
        assert time.monotonic() - start < 30
    finally:
        ray.kill(sampler)
