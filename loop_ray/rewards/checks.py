"""Checks of what a reward returned: rewards are black boxes, so nothing they return is trusted.

`check_rewards(result, n, name)` turns whatever a reward returned for n images into float32 [n]
with NaN marking the invalid images, plus a description of what was wrong (None when nothing
was): a result that is not numeric or not shaped [n] invalidates all n images; NaN or +-inf
values invalidate only their images. `call_reward` also catches the reward raising (all n images
invalid). A group with any invalid image is rejected as a whole (never learned from); when an
iteration has no group left, `InvalidRewardsError` stops the run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


def _invalid(n: int) -> np.ndarray:
    return np.full(n, np.nan, np.float32)


def check_rewards(result, n: int, name: str = "reward") -> tuple[np.ndarray, str | None]:
    """(rewards float32 [n], NaN where invalid; what was wrong or None) for a reward's `result`.

    `result` is what the reward returned for n images (an exception it raised counts as a result:
    all n images invalid).
    """
    what = f"reward term {name!r}"
    if isinstance(result, BaseException):
        return _invalid(n), f"{what} raised {type(result).__name__}: {result}"
    try:
        if hasattr(result, "detach"):  # a torch tensor, on any device
            result = result.detach().cpu().numpy()
        values = np.asarray(result)
    except Exception as err:  # noqa: BLE001 - whatever it returned, it is not an array
        return _invalid(n), f"{what} returned a non-numeric {type(result).__name__} ({err}) for {n} images"
    if values.dtype.kind not in "biuf":
        return _invalid(n), f"{what} returned non-numeric values (dtype {values.dtype}) for {n} images"
    if values.shape != (n,):
        return _invalid(n), f"{what} returned shape {values.shape} for {n} images"
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 becomes inf: invalid
        values = values.astype(np.float32)
    bad = ~np.isfinite(values)
    if not bad.any():
        return values, None
    kinds = {"NaN": np.isnan(values), "+inf": values == np.inf, "-inf": values == -np.inf}
    found = ", ".join(f"{int(m.sum())} {k}" for k, m in kinds.items() if m.any())
    values[bad] = np.nan
    return values, f"{what} returned non-finite values ({found}) for {n} images"


def call_reward(reward, images, prompts: Sequence[str], name: str = "reward") -> tuple[np.ndarray, str | None]:
    """Call `reward(images, prompts)` and check its result; an exception it raises is logged with
    the term's name and makes all its images invalid instead of propagating."""
    n = len(prompts)
    try:
        result = reward(images, list(prompts))
    except Exception as err:  # a user's reward may raise anything
        log.warning("reward term %r raised on %d images; they are rejected", name, n, exc_info=True)
        result = err
    return check_rewards(result, n, name)


def describe_problems(problems: Sequence[str], limit: int = 3) -> str:
    """The first `limit` distinct problems, joined, with a count of the rest."""
    distinct = list(dict.fromkeys(problems))
    text = "; ".join(distinct[:limit])
    if len(distinct) > limit:
        text += f" (and {len(distinct) - limit} more)"
    return text or "no reward problem was reported"


class InvalidRewardsError(RuntimeError):
    """Every group of an iteration was rejected for invalid rewards: nothing to learn from."""

    def __init__(self, iteration: int, groups: int, problems: Sequence[str]):
        self.iteration, self.groups, self.problems = iteration, groups, list(problems)
        super().__init__(
            f"iteration {iteration}: all {groups} groups were rejected for invalid rewards (NaN, inf, "
            f"a wrong shape or an error), so there is nothing to learn from; {describe_problems(problems)}"
        )
