"""`loop-ray study`: the paper's efficiency-effectiveness comparison on the embedded world.

Every method of the paper's study (REINFORCE, REINFORCE with a prompt-mean baseline, PPO = DDPO,
LOOP with K = 2, 3, 4) and its neighbours (RLOO, GRPO) trains from the same pre-trained model with
the same budget of generated images (so a method with K samples per prompt sees fewer prompts),
with several seeds each, through the single-process loop (`loop_ray.training.single_process`), the same maths as the
Ray system. It writes:
  results.json   everything measured
  table.md       held-out reward per prompt category, mean +- std over seeds (the paper's Tables 1-2)
  curves.png     train reward against images seen, mean and 80 % interval over seeds (Figures 2-3)
and the wall time and images/s of each run. The pre-trained model is evaluated once (it is the same
for every run); each finished run is cached under OUT/cache/ by a hash of its configuration, so an
interrupted study continues where it stopped. `--quick` shrinks everything to a smoke test.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

# label -> (preset, K)
METHODS: dict[str, tuple[str, int]] = {
    "reinforce": ("reinforce", 1),
    "reinforce_bc": ("reinforce_bc", 4),
    "ppo": ("ppo", 1),
    "loop_k2": ("loop", 2),
    "loop_k3": ("loop", 3),
    "loop_k4": ("loop", 4),
    "rloo": ("rloo", 4),
    "grpo": ("grpo", 4),
    "nft": ("nft", 4),
    "rwr": ("rwr", 4),
}


def method_overrides(label: str, images_per_iteration: int) -> dict:
    """Config overrides of one method: every key of its preset (so the base config's epochs or
    estimator cannot leak into another method), its K, and prompts per iteration for the budget."""
    from loop_ray.algorithms import PRESETS

    preset, k = METHODS[label]
    if images_per_iteration % k:
        raise ValueError(f"study: images_per_iteration={images_per_iteration} is not divisible by K={k} ({label})")
    return {"algorithm.objective": "policy_gradient", **PRESETS[preset], "algorithm.preset": preset, "sampling.k": k,
            "sampling.prompts_per_iteration": images_per_iteration // k}


def _run_one(job: dict) -> dict:
    """One (method, seed) run in its own process."""
    from loop_ray.config import config_from_dict
    from loop_ray.training.single_process import SingleProcessRun
    from loop_ray.utils import pin_threads

    pin_threads(job["threads"])
    import torch

    overrides = {**job["overrides"], "seed": job["seed"], "name": f"{job['label']}-s{job['seed']}"}
    cfg = config_from_dict(job["config"], source=job["source"], overrides=overrides)
    torch.manual_seed(job["seed"])
    start = time.perf_counter()
    run = SingleProcessRun(cfg, device=job["device"])
    result = run.run(before=job.get("before"))
    wall = time.perf_counter() - start
    history = result["history"]
    return {
        "label": job["label"],
        "seed": job["seed"],
        "preset": cfg.algorithm.preset,
        "k": cfg.sampling.k,
        "iterations": cfg.iterations,
        "images_seen": [h["images_seen"] for h in history],
        "train_reward": [h["train/reward_mean"] for h in history],
        "before": result["before"],
        "after": result["after"],
        "wall_seconds": wall,
        "train_images_per_second": history[-1]["images_seen"] / sum(h["iteration_seconds"] for h in history)
        if history else float("nan"),
        "clip_fraction": float(np.mean([h.get("learner/clip_fraction", np.nan) for h in history]))
        if history else float("nan"),
        "objective": cfg.algorithm.objective,
    }


def summarise(runs: list[dict]) -> dict:
    """Per method: held-out reward per category (mean, std over seeds), and time figures."""
    out: dict[str, dict] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        cats = list(rs[0]["after"]["categories"])
        table = {}
        for c in [*cats, "all"]:
            vals = [r["after"]["mean"] if c == "all" else r["after"]["categories"][c]["mean"] for r in rs]
            before = [r["before"]["mean"] if c == "all" else r["before"]["categories"][c]["mean"] for r in rs]
            table[c] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "before": float(np.mean(before))}
        out[label] = {
            "k": rs[0]["k"],
            "seeds": len(rs),
            "held_out": table,
            "wall_seconds": float(np.mean([r["wall_seconds"] for r in rs])),
            "train_images_per_second": float(np.mean([r["train_images_per_second"] for r in rs])),
        }
    return out


def markdown_table(summary: dict, budget: int, device: str) -> str:
    cats = list(next(iter(summary.values()))["held_out"])
    lines = [
        (f"Held-out reward after training on {budget} generated images per run (mean ± std over seeds; "
         f"'pre-trained' is the model before RL). Device: {device}."),
        "",
        "| method | K | " + " | ".join(cats) + " | s/run | img/s |",
        "|---|---|" + "---|" * len(cats) + "---|---|",
    ]
    # the pre-trained model, evaluated with each method's sampler (one row unless a preset changes it)
    groups: dict[tuple, list[str]] = {}
    for label, s in summary.items():
        groups.setdefault(tuple(s["held_out"][c]["before"] for c in cats), []).append(label)
    for values, labels in groups.items():
        name = "pre-trained" if len(groups) == 1 else f"pre-trained, sampled as {', '.join(labels)}"
        lines.append(f"| {name} | – | " + " | ".join(f"{v:.3f}" for v in values) + " | | |")
    for label, s in summary.items():
        cells = " | ".join(f"{s['held_out'][c]['mean']:.3f} ± {s['held_out'][c]['std']:.3f}" for c in cats)
        lines.append(f"| {label} | {s['k']} | {cells} | {s['wall_seconds']:.0f} | {s['train_images_per_second']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict], path: Path) -> Path:
    """Train reward against images seen: mean over seeds and the 10-90 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        x = np.asarray(rs[0]["images_seen"])
        y = np.asarray([r["train_reward"] for r in rs])
        ax.plot(x, y.mean(0), label=label)
        if len(rs) > 1:
            lo, hi = np.percentile(y, [10, 90], axis=0)
            ax.fill_between(x, lo, hi, alpha=0.15)
    ax.set_xlabel("images generated")
    ax.set_ylabel("train reward (batch mean)")
    ax.set_title("loop-ray study on the embedded world (80 % interval over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cache_path(out_dir: Path, name: str, spec: dict) -> Path:
    """Where a result is stored: out_dir/cache/ by name and a hash of everything it depends on, so an
    interrupted study continues where it stopped and a finished run is never run twice."""
    return out_dir / "cache" / f"{name}-{_key(spec)}.json"


def _cached(out_dir: Path, name: str, spec: dict, compute):
    """The stored result (see `_cache_path`), else `compute()` stored."""
    path = _cache_path(out_dir, name, spec)
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    _write_json(path, value)
    return value


def _write_json(path: Path, value) -> None:
    """Written under a temporary name and renamed, so a killed study never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


# the sampling keys that change how the evaluation samples (it samples every step with the policy's noise)
_EVAL_SAMPLER_KEYS = ("sampling.eta", "sampling.flow_noise_level", "sampling.flow_sde")


def _evaluate_before(data: dict, source: str, overrides: dict, device: str, threads: int) -> dict:
    """The pre-trained model's held-out reward: the same for every method and seed of a study
    (same model, eval prompts and seeds), so it is computed once."""
    from loop_ray.config import config_from_dict
    from loop_ray.training.single_process import SingleProcessRun
    from loop_ray.utils import pin_threads

    pin_threads(threads)
    return SingleProcessRun(config_from_dict(data, source=source, overrides=overrides), device=device).evaluate_before()


def _job_spec(job: dict) -> dict:
    return {k: v for k, v in job.items() if k not in ("threads", "before")}


def _run_all(jobs: list[dict], out_dir: Path, workers: int) -> list[dict]:
    """Every job's result, in job order: from the cache where a run already finished, else run
    (in `workers` processes) and cached as soon as it finishes."""
    results: dict[int, dict] = {}
    todo = []
    for i, job in enumerate(jobs):
        path = _cache_path(out_dir, f"{job['label']}-s{job['seed']}", _job_spec(job))
        if path.is_file():
            results[i] = json.loads(path.read_text())
        else:
            todo.append((i, path))
    if todo:
        print(f"study: {len(jobs) - len(todo)} of {len(jobs)} runs cached, {len(todo)} to run", flush=True)

    def store(i: int, path: Path, result: dict) -> None:
        results[i] = result
        _write_json(path, result)
        after = result["after"]["mean"]
        print(f"study: {result['label']} seed {result['seed']}: held-out {after:.3f} "
              f"({result['wall_seconds']:.0f} s; {len(results)}/{len(jobs)})", flush=True)

    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, jobs[i]): (i, path) for i, path in todo}
            for future in as_completed(futures):
                store(*futures[future], future.result())
    else:
        for i, path in todo:
            store(i, path, _run_one(jobs[i]))
    return [results[i] for i in range(len(jobs))]


def run_study(config_path: str, out_dir: Path, methods: list[str], seeds: list[int], images_per_iteration: int,
              iterations: int, device: str, workers: int, threads: int, extra: dict | None = None) -> dict:
    from loop_ray.config import config_from_dict, read_config_data

    data = read_config_data(config_path)
    base = {"iterations": iterations, **(extra or {})}
    if not seeds:
        raise ValueError("study: no seeds to run (--seeds must be at least 1)")
    per_method = {}
    for label in methods:
        per_method[label] = {**base, **method_overrides(label, images_per_iteration)}
        config_from_dict(data, source=config_path, overrides=per_method[label])  # fail fast, before any run
    # seed-major: every method's first seed runs before any second seed, so a study stopped early
    # (its finished runs are cached) already compares every method
    jobs = [{"config": data, "source": config_path, "overrides": per_method[label], "label": label,
             "seed": seed, "device": device, "threads": threads} for seed in seeds for label in methods]
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    before = {}
    for label, overrides in per_method.items():  # the pre-trained model evaluated as the method samples
        sampler = {k: overrides[k] for k in _EVAL_SAMPLER_KEYS if k in overrides}  # (a preset may set eta 0)
        spec = {"config": data, "extra": extra or {}, "device": device, **({"sampler": sampler} if sampler else {})}
        before[label] = _cached(out_dir, "before", spec,
                                lambda s=sampler: _evaluate_before(data, config_path, {**base, **s}, device, threads))
    for j in jobs:
        j["before"] = before[j["label"]]
    runs = _run_all(jobs, out_dir, workers)
    summary = summarise(runs)
    device_name = device
    if device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name()
    budget = images_per_iteration * iterations
    report = {
        "config": config_path, "device": device_name, "seeds": seeds, "images_per_iteration": images_per_iteration,
        "iterations": iterations, "budget_images": budget, "wall_seconds": time.perf_counter() - start,
        "summary": summary, "runs": runs, "command": " ".join(sys.argv),
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "table.md").write_text(markdown_table(summary, budget, device_name))
    plot_curves(runs, out_dir / "curves.png")
    return report


# --quick: a smoke test of the whole study (1 seed, 1 iteration, tiny sampling and evaluation)
QUICK_OVERRIDES = {"sampling.num_steps": 4, "sampling.batch_size": 12, "learner.minibatch_size": 4,
                   "learner.minibatches_per_step": 1, "eval.images_per_prompt": 2, "eval.max_prompts": 3,
                   "eval.batch_size": 6}
QUICK_IMAGES_PER_ITERATION = 12
