"""Bounded waits on Ray calls, and what Ray knows about the actors behind them.

Every driver-side wait goes through `wait_for`: a `ray.wait` loop with a deadline that, every
`report_every` seconds, logs which calls are still outstanding, on which actor, on which node and
in which state Ray's actor table has that actor (ALIVE, RESTARTING, PENDING_CREATION, DEAD). A
call past its deadline raises `CallTimeoutError` (a `ray.exceptions.GetTimeoutError`, so callers
that treat a failed call as lost and send it again treat a late one the same way).

The actor table is read from Ray's GCS (`ray._private.state.actors`), which needs no dashboard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import ray

log = logging.getLogger(__name__)

LIVE_STATES = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "ALIVE", "RESTARTING")


class CallTimeoutError(ray.exceptions.GetTimeoutError):
    """A call did not finish within its deadline."""


def actor_info(actor) -> dict:
    """Ray's actor-table entry of `actor` ({} when Ray has none or cannot be asked)."""
    try:
        from ray._private import state

        return state.actors(actor_id=actor._actor_id.hex()) or {}
    except Exception as err:  # noqa: BLE001 - diagnostics only: never fail a wait because of them
        log.debug("actor table not readable: %s", err)
        return {}


def actor_state(actor) -> str:
    """ALIVE, RESTARTING, PENDING_CREATION, DEPENDENCIES_UNREADY, DEAD, or UNKNOWN."""
    return actor_info(actor).get("State", "UNKNOWN")


def describe_actor(actor) -> str:
    """'<class> <id prefix> on node <node prefix> (pid N): STATE' from Ray's actor table."""
    info = actor_info(actor)
    if not info:
        return f"actor {actor._actor_id.hex()[:8]}: state unknown"
    node = info.get("Address", {}).get("NodeID", "")[:8] or "?"
    return (f"{info.get('ActorClassName', 'actor')} {info['ActorID'][:8]} on node {node} "
            f"(pid {info.get('Pid', '?')}): {info.get('State', 'UNKNOWN')}")


def live_actors() -> list[dict]:
    """Every actor of the cluster that is not DEAD (its actor-table entry)."""
    from ray._private import state

    return [a for a in state.actors().values() if a.get("State") in LIVE_STATES]


def wait_for(refs: Sequence, timeout_s: float, what: str, actors: Sequence | None = None,
             report_every: float = 60.0) -> list:
    """ray.get(refs) within `timeout_s` seconds. `what` names the calls in the log and the error;
    `actors[i]` (optional) is the actor running refs[i], described with its node and state in
    every report and in the CallTimeoutError raised at the deadline. The first call that fails
    raises its error at once (the caller can then stop the calls still running)."""
    refs = list(refs)
    start = time.monotonic()
    deadline = start + timeout_s
    pending = list(refs)
    next_report = start + report_every
    while pending:
        now = time.monotonic()
        if now >= deadline:
            raise CallTimeoutError(f"{what}: no answer within {timeout_s:g} s; "
                                   f"{_outstanding(refs, pending, actors)}")
        if now >= next_report:
            log.info("%s: waited %.0f s of %g s; %s", what, now - start, timeout_s,
                     _outstanding(refs, pending, actors))
            next_report = now + report_every
        done, pending = ray.wait(pending, num_returns=1, timeout=min(next_report, deadline) - now)
        if done and pending:
            ray.get(done)  # a call that failed raises now, without waiting for the others
    return ray.get(refs)


def _outstanding(refs: list, pending: list, actors: Sequence | None) -> str:
    waiting = set(pending)
    lines = []
    for i, ref in enumerate(refs):
        if ref in waiting:
            on = f" on {describe_actor(actors[i])}" if actors is not None else ""
            lines.append(f"call {i}{on}")
    return f"{len(pending)} of {len(refs)} calls outstanding: " + "; ".join(lines)
