"""Small process-level helpers shared by every role."""

from __future__ import annotations

import os


def pin_threads(n: int = 1) -> None:
    """Pin torch's intra-op and OpenMP threads to `n` in this process.

    Ray gives an actor OMP_NUM_THREADS equal to its CPUs; on a small machine two OpenMP threads
    under load ran several times slower than one, so every process and actor calls this first.
    """
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already set once in this process
        pass


def output_folder(path, flag: str = "--out"):
    """Create the output folder `path` (and its parents) before any work is done, so that a path that
    cannot be written fails at once, naming the flag; returns it as a Path."""
    from pathlib import Path

    from loop_ray.config import ConfigError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{flag} {path}: cannot create the folder ({err.strerror or err})") from None
    return path
