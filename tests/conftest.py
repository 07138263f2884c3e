"""Shared test fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (system tests): 2 logical CPUs, so tests give
    their actors fractional CPUs; one torch thread per actor; dashboard off. The workers get this
    folder on PYTHONPATH, as a user's reward module would be, so they can import test helpers such
    as faulty_rewards by import path (pytest puts it on the driver's sys.path)."""
    import ray

    if not ray.is_initialized():
        path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")]))
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": path}
        os.environ.update(env)
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    yield ray
    ray.shutdown()
