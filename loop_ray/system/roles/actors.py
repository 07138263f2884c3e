"""The actors of one role (samplers or reward servers), replaceable when one is lost.

Two layers of fault handling: Ray itself restarts a crashed actor up to `cluster.max_restarts`
times and re-runs its in-flight calls (`max_task_retries`); when an actor is gone for good (its
restarts used up, its node lost, or `ray.kill`ed), `revive(i)` starts a fresh actor of the same
rank in its place. A fresh sampler starts at policy version 0 and loads the published weights the
driver hands it with its next call, so it samples exactly what the lost one would have.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import ray

log = logging.getLogger(__name__)


def get_or_none(ref, what: str):
    """ray.get(ref), or None (with a warning naming `what`) when the call's actor or task failed."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:
        log.warning("%s failed: %s", what, str(err).splitlines()[0])
        return None


class ActorSet:
    def __init__(self, role: str, actors: list, factory: Callable[[int], object] | None = None,
                 ping_timeout: float = 300.0):
        self.role = role
        self._actors = list(actors)
        self._factory = factory
        self.ping_timeout = ping_timeout
        self.replaced = 0  # actors started in place of lost ones

    def __len__(self) -> int:
        return len(self._actors)

    def __getitem__(self, i: int):
        return self._actors[i]

    def __iter__(self) -> Iterator:
        return iter(list(self._actors))

    def revive(self, i: int):
        """Actor i if it answers (after a restart by Ray, if one is under way), else a fresh actor
        of rank i started in its place."""
        actor = self._actors[i]
        try:
            ray.get(actor.ping.remote(), timeout=self.ping_timeout)
            return actor
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            if self._factory is None:
                raise
            log.warning("%s %d is lost (%s); starting a new one in its place", self.role, i, type(err).__name__)
        ray.kill(actor, no_restart=True)
        fresh = self._factory(i)
        ray.get(fresh.ping.remote(), timeout=self.ping_timeout)
        self._actors[i] = fresh
        self.replaced += 1
        return fresh

    def kill_all(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
