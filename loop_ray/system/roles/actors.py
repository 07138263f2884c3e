"""The actors of one role (samplers or reward servers), replaceable when one is lost.

Two layers of fault handling: Ray itself restarts a crashed actor up to `cluster.max_restarts`
times and re-runs its in-flight calls (`max_task_retries`); when an actor is gone for good (its
restarts used up, its node lost, or `ray.kill`ed), `revive(i)` starts a fresh actor of the same
rank in its place. A fresh sampler starts at policy version 0 and loads the published weights the
driver hands it with its next call, so it samples exactly what the lost one would have.

Liveness never queues behind work: `ping` runs in the actors' own `liveness` concurrency group
(a thread beside the one that samples or scores), and an actor Ray's actor table lists as ALIVE
is kept even when its ping is slow; only an actor Ray reports DEAD (or that never comes back from
RESTARTING / PENDING_CREATION within the start-up deadline) is replaced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import ray

from loop_ray.system.roles.waits import CallTimeoutError, actor_state, describe_actor, wait_for

log = logging.getLogger(__name__)

LIVENESS_GROUP = "liveness"  # the concurrency group of every actor's `ping`
CONCURRENCY_GROUPS = {LIVENESS_GROUP: 1}


def get_or_none(ref, what: str, timeout_s: float | None = None, actor=None):
    """ray.get(ref) (within `timeout_s` when given), or None with a warning naming `what` when
    the call's actor or task failed or the call is past its deadline."""
    try:
        if timeout_s is None:
            return ray.get(ref)
        return wait_for([ref], timeout_s, what, None if actor is None else [actor])[0]
    except ray.exceptions.RayError as err:
        log.warning("%s failed: %s", what, str(err).splitlines()[0])
        if isinstance(err, CallTimeoutError):
            _cancel(ref)
        return None


def _cancel(ref) -> None:
    """Drop a late call if it is still queued (a running one finishes; its result is ignored)."""
    try:
        ray.cancel(ref)
    except Exception as err:  # noqa: BLE001 - best effort: the call is already treated as failed
        log.debug("could not cancel a late call: %s", err)


class ActorSet:
    def __init__(self, role: str, actors: list, factory: Callable[[int], object] | None = None,
                 ping_timeout: float = 60.0, startup_timeout: float = 1800.0):
        self.role = role
        self._actors = list(actors)
        self._factory = factory
        self.ping_timeout = ping_timeout
        self.startup_timeout = startup_timeout
        self.replaced = 0  # actors started in place of lost ones

    def __len__(self) -> int:
        return len(self._actors)

    def __getitem__(self, i: int):
        return self._actors[i]

    def __iter__(self) -> Iterator:
        return iter(list(self._actors))

    def _answers(self, actor, i: int) -> bool:
        """Whether actor i is usable: it answers a ping, or Ray lists it ALIVE (busy, not lost), or
        it comes back from a restart within the start-up deadline. False once Ray has it DEAD."""
        deadline = time.monotonic() + self.startup_timeout
        ref = actor.ping.remote()
        while True:
            try:
                ray.get(ref, timeout=self.ping_timeout)
                return True
            except ray.exceptions.RayActorError:
                return False
            except ray.exceptions.GetTimeoutError:
                state = actor_state(actor)
                if state == "ALIVE":
                    log.warning("%s %d is slow to answer a ping but ALIVE (%s); keeping it",
                                self.role, i, describe_actor(actor))
                    return True
                if state == "DEAD" or time.monotonic() >= deadline:
                    return False
                log.info("%s %d is %s; waiting for it", self.role, i, state)

    def revive(self, i: int):
        """Actor i if it is alive (after a restart by Ray, if one is under way), else a fresh
        actor of rank i started in its place. The fresh actor takes the place before it is pinged
        (so shutdown stops it whatever happens); one that never answers is killed and the
        RayActorError / CallTimeoutError raised."""
        actor = self._actors[i]
        if self._answers(actor, i):
            return actor
        if self._factory is None:
            raise ray.exceptions.RayActorError(error_msg=f"{self.role} {i} is lost")
        log.warning("%s %d is lost (%s); starting a new one in its place", self.role, i, describe_actor(actor))
        ray.kill(actor, no_restart=True)
        fresh = self._factory(i)
        self._actors[i] = fresh
        self.replaced += 1
        try:
            wait_for([fresh.ping.remote()], self.startup_timeout, f"new {self.role} {i} starting", [fresh])
        except ray.exceptions.RayError:
            ray.kill(fresh, no_restart=True)
            raise
        return fresh

    def kill_all(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
