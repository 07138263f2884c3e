"""The benchmarks' end-to-end figure: iterations of the Ray system against the same iterations'
parts run in one process without Ray (loop_ray.training.single_process), and the peak RSS of every role.

Both sides run the toy world on a small batch (4 prompts x K=4) with the same config, prompts and
seeds; an iteration's time is the driver's `iteration_seconds` (sample + score + learn + publish),
the first iteration being the warm-up. Peak RSS is each actor process's VmHWM.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import ray

from loop_ray.config import load_config


def _summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def _vmhwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _actor_peak_rss(actor) -> float:
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    return _vmhwm_mb(pid)


def bench_end_to_end(repeats: int) -> tuple[dict, dict]:
    from loop_ray.prompts import load_prompts
    from loop_ray.system.launch import cluster
    from loop_ray.system.launch.launch import System
    from loop_ray.system.run.driver import Trainer
    from loop_ray.system.run.run_dir import RunDir
    from loop_ray.training.single_process import SingleProcessRun

    iterations = repeats + 1
    common = [f"iterations={iterations}", "sampling.prompts_per_iteration=4", "learner.num_workers=1",
              "learner.minibatch_size=8", "learner.minibatches_per_step=1", "eval.max_prompts=1",
              "eval.images_per_prompt=1", "logging.progress_bar=false", "logging.tensorboard=false",
              "cluster.num_samplers=1", "cluster.sampler_cpus=0.5", "cluster.reward_cpus=0.25",
              "learner.num_cpus_per_worker=0.5"]
    out, memory = {}, {}
    local_cfg = load_config("configs/toy.yaml", common)
    run = SingleProcessRun(local_cfg)
    local_times = []
    for i in range(iterations):
        start = time.perf_counter()
        run.step(i)
        local_times.append(time.perf_counter() - start)
    local = _summary(local_times[1:])
    with tempfile.TemporaryDirectory() as tmp:
        for mode, extra in (("sync", ["cluster.mode=sync"]), ("async", ["cluster.mode=async", "cluster.max_staleness=1"])):
            cfg = load_config("configs/toy.yaml", [*common, *extra, f"output_dir={tmp}"])
            started = cluster.connect(cfg)
            system = System.start(cfg)
            rundir = RunDir.create(cfg)
            try:
                trainer = Trainer(cfg, system, rundir, load_prompts(cfg.prompts.train), load_prompts(cfg.prompts.val))
                result = trainer.train()
                times = [r["iteration_seconds"] for r in result.records if r.get("kind") != "eval"
                         and "iteration_seconds" in r][1:]
                ray_t = _summary(times)
                out[mode] = {"ray": ray_t, "local": local}  # loop_ray.bench adds the throughput ratio
                if mode == "sync":
                    memory["sampler"] = max(_actor_peak_rss(a) for a in system.samplers)
                    memory["reward"] = max(_actor_peak_rss(a) for a in system.reward_pool.actors)
                    memory["learner"] = max(_actor_peak_rss(a) for a in system.learner.workers)
            finally:
                rundir.close()
                system.shutdown()
                if started:
                    ray.shutdown()
    return out, memory
