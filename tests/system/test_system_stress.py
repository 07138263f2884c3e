"""The asynchronous end-to-end run with a KL penalty on a machine whose cores are all busy: two
busy-loop processes per core beside it. Every wait is bounded and liveness does not queue behind
work, so the run finishes (under the slow tests' per-test timeout) with the records of the same run
on an idle machine."""

import json
import os
import subprocess
import sys

import pytest

from loop_ray.config import load_config
from loop_ray.system.run.driver import train

pytestmark = pytest.mark.slow

KEYS = ("iteration", "version", "train/reward_mean", "train/samples_learned", "staleness/mean", "learner/loss",
        "learner/kl_ref", "learner/grad_norm")


def _records(tmp_path, name):
    cfg = load_config("configs/debug.yaml", {
        "output_dir": str(tmp_path / name), "iterations": 3, "cluster.mode": "async", "cluster.max_staleness": 1,
        "eval.max_prompts": 1, "eval.images_per_prompt": 1, "logging.tensorboard": False,
        "algorithm.kl_beta": 0.1, "cluster.ping_timeout_s": 1.0,
    })
    lines = (train(cfg).run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in KEYS} for r in map(json.loads, lines) if r["kind"] == "train"]


def test_async_kl_run_under_full_cpu_load_equals_the_idle_run(ray_session, tmp_path):
    idle = _records(tmp_path, "idle")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        loaded = _records(tmp_path, "loaded")
    finally:
        for p in hogs:
            p.kill()
        for p in hogs:
            p.wait(timeout=30)
    assert loaded == idle
    assert [r["train/samples_learned"] for r in loaded] == [8, 8, 8]
