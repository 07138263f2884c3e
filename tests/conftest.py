"""Shared test fixtures."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (system tests): 2 logical CPUs, so tests give
    their actors fractional CPUs; one torch thread per actor; dashboard off."""
    import ray

    if not ray.is_initialized():
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        os.environ.update(env)
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    yield ray
    ray.shutdown()
