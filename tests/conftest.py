"""Shared test fixtures, and what makes a hung or leaky test visible: pytest-timeout stops a test
past its limit (pyproject.toml; slow tests get SLOW_TIMEOUT_S) printing every thread's stack, so
does a SIGTERM from an outer `timeout`; actor output reaches the driver, so pytest shows it with
a failing test's captured output; a Ray test starts only once the previous test's actors are
gone and their CPUs free, else fails naming the actors still there."""

import faulthandler
import os
import signal
import time
from pathlib import Path

import pytest

SLOW_TIMEOUT_S = 1200  # per test marked slow (start-up of Ray and DeepSpeed on 2 loaded cores included)
CLEAN_START_S = 30  # how long a Ray test waits for the previous test's actors to be gone

faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


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
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def ray_starts_clean(request):
    """A test on the shared Ray starts with no actor left from the previous test and every CPU
    free (waiting up to CLEAN_START_S for actors being stopped); otherwise it fails naming them."""
    if "ray_session" not in request.fixturenames:
        yield
        return
    import ray

    from loop_ray.system.roles.waits import live_actors

    if ray.is_initialized():
        deadline = time.monotonic() + CLEAN_START_S
        while True:
            left = live_actors()
            total, free = ray.cluster_resources().get("CPU", 0.0), ray.available_resources().get("CPU", 0.0)
            if not left and free >= total:
                break
            if time.monotonic() >= deadline:
                names = ", ".join(f"{a['ActorClassName']} {a['ActorID'][:8]} ({a['State']})" for a in left)
                pytest.fail(f"Ray is not clean at the start of this test: actors left from a previous test: "
                            f"{names or 'none'}; {free:g} of {total:g} CPUs free", pytrace=False)
            time.sleep(0.2)
    yield
