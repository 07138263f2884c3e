"""Which sampler steps are stochastic (and so trained) in an iteration: pure functions of the config.

The paper makes every DDIM step stochastic (eta = 1) and trains on all of them. The newer methods
cut cost and noise by making only some steps stochastic: a fixed set, or a window of W consecutive
steps placed per iteration, fixed, at random, or sliding from early to late steps over training
(MixGRPO, arXiv 2507.21802). Steps outside run deterministically (eta = 0), store log-prob 0 and
are never trained. `stochastic_steps` returns the iteration's step indices (None = all steps), a
function of (config, iteration) alone, so every sampler of an iteration and a resumed run agree.
"""

from __future__ import annotations

import numpy as np


def _window_bounds(sampling) -> tuple[int, int]:
    """(lowest start, highest end exclusive) a window may take."""
    end = sampling.sde_window_end if sampling.sde_window_end is not None else sampling.num_steps
    return sampling.sde_window_start, end


def stochastic_steps(sampling, iteration: int, iterations: int, seed: int) -> list[int] | None:
    """The stochastic step indices of `iteration` (of `iterations`), or None for all steps.

    sde_steps: that list every iteration. sde_window W: steps [s, s + W) with s = sde_window_start
    (fixed), s drawn uniformly from [start, end - W] by a generator seeded with (seed, iteration)
    (random), or s moving linearly from start to end - W over the iterations (sliding).
    """
    if sampling.sde_steps is not None:
        return sorted(int(j) for j in sampling.sde_steps)
    width = sampling.sde_window
    if width is None:
        return None
    lo, hi = _window_bounds(sampling)
    last_start = hi - width
    placement = sampling.sde_window_placement
    if placement == "fixed":
        start = lo
    elif placement == "random":
        start = int(np.random.default_rng([seed, iteration, 0x5DE]).integers(lo, last_start + 1))
    else:  # sliding
        start = lo + (last_start - lo) * iteration // max(1, iterations - 1)
    return list(range(start, start + width))


def check_sde_config(sampling, skip_first: int, skip_last: int) -> None:
    """ValueError naming the key when the step choice cannot work."""
    T = sampling.num_steps
    if sampling.sde_steps is not None:
        if sampling.sde_window is not None:
            raise ValueError("sampling.sde_steps and sampling.sde_window: give one of them, not both")
        bad = [j for j in sampling.sde_steps if not 0 <= j < T]
        if not sampling.sde_steps or bad or len(set(sampling.sde_steps)) != len(sampling.sde_steps):
            raise ValueError(
                f"sampling.sde_steps={sampling.sde_steps}: expected distinct step indices in 0..{T - 1}"
            )
        stochastic = len(sampling.sde_steps)
    elif sampling.sde_window is not None:
        lo, hi = _window_bounds(sampling)
        if not (0 <= lo and hi <= T and hi - lo >= sampling.sde_window):
            raise ValueError(
                f"sampling.sde_window={sampling.sde_window}: does not fit between sde_window_start={lo} and "
                f"sde_window_end={hi} of sampling.num_steps={T} steps"
            )
        stochastic = sampling.sde_window
    else:
        stochastic = T
    if skip_first + skip_last >= stochastic:
        raise ValueError(
            f"algorithm.skip_first_steps + algorithm.skip_last_steps = {skip_first + skip_last} leave none "
            f"of the {stochastic} stochastic steps (sampling.num_steps / sde_steps / sde_window) to train on"
        )
