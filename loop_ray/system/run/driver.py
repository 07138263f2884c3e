"""The Ray run's driver (`loop-ray train`, whose command line is loop_ray.cli.train).

The driver orders one iteration after another: plan prompts and seeds, fan them out to the
samplers, chain their images to the reward actors, fill the buffer, run the learner group on the
complete groups, publish the new weights; evaluate before training, every `eval.every` iterations
and after; log, plot and checkpoint. It holds ObjectRefs, never trajectories or training images.

Synchronous mode samples iteration i with the weights of version i. Asynchronous mode keeps the
rollouts of the next `cluster.max_staleness` iterations in flight while the learner trains, so
samples are at most that many versions old when learned from (the stored behaviour log-probs keep
the importance ratio correct).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import ray

from loop_ray.algorithms import StatTracker
from loop_ray.config import ExperimentConfig, load_config
from loop_ray.prompts import PromptSet
from loop_ray.rewards.checks import InvalidRewardsError, describe_problems
from loop_ray.system.launch import cluster
from loop_ray.system.roles.buffer import TrajectoryBuffer
from loop_ray.system.run.evaluation import EvalResult, comparison_table, evaluate
from loop_ray.system.run.metrics import iteration_record
from loop_ray.system.run.resume import (
    ResumePoint,
    capture_rng,
    check_resumable,
    restore_rng,
)
from loop_ray.system.run.rollout import collect, dispatch
from loop_ray.system.run.run_dir import RunDir
from loop_ray.system.run.validate import validate_inputs
from loop_ray.training.checkpoint import save_checkpoint
from loop_ray.training.plan import plan_eval, plan_iteration
from loop_ray.utils import pin_threads

log = logging.getLogger("loop_ray.driver")


@dataclass
class TrainResult:
    run_dir: Path
    before: EvalResult | None
    after: EvalResult | None
    records: list[dict]


class Trainer:
    def __init__(self, cfg: ExperimentConfig, system, run: RunDir, train_set: PromptSet, val_set: PromptSet):
        self.cfg, self.system, self.run = cfg, system, run
        self.train_set, self.val_set = train_set, val_set
        self.eval_plan = plan_eval(cfg, val_set)
        self.buffer = TrajectoryBuffer(
            cfg.sampling.k, cfg.algorithm.advantage, cfg.algorithm.std_eps, StatTracker.for_algorithm(cfg.algorithm),
            cfg.algorithm.control, cfg.seed,
        )
        self.version, self.weights, self.images_seen = 0, None, 0
        self.records: list[dict] = []
        self.before: EvalResult | None = None

    # ------------------------------------------------------------------------------- pieces
    def evaluate(self, iteration: int, label: str) -> EvalResult:
        grid = self.run.path / "eval" / f"{label}.png"
        result = evaluate(self.cfg, self.eval_plan, self.system.samplers, self.system.reward_pool,
                          self.version, self.weights, grid)
        record = {"kind": "eval", "label": label, "iteration": iteration, "version": self.version,
                  "images_seen": self.images_seen, **result.record()}
        self.run.log(record, self.images_seen)
        if result.grid is not None:
            self.run.log_image("eval/grid", result.grid, self.images_seen, caption=label)
        self.run.add_eval_point(self.images_seen, result.mean)
        self.records.append(record)
        return result

    def dispatch(self, iteration: int):
        plan = plan_iteration(self.cfg, self.train_set, iteration)
        return dispatch(self.system.samplers, self.system.reward_pool, plan, self.version, self.weights,
                        self.cfg.reward.batch_size)

    def learn(self, iteration: int, reward_problems: Sequence[str] = ()):
        """Take the complete, fresh-enough groups from the buffer and run the learner on them.
        Groups with an invalid reward are rejected; when every group was, InvalidRewardsError."""
        batch = self.buffer.take(self.version, self.cfg.cluster.max_staleness)
        incomplete = self.buffer.clear()  # a group still incomplete after collect never completes
        if batch.rejected_groups:
            if len(batch) == 0 and batch.dropped_stale == 0 and incomplete == 0:
                raise InvalidRewardsError(iteration, batch.rejected_groups, reward_problems)
            log.warning("iteration %d: %d groups rejected for invalid rewards (not learned from): %s",
                        iteration, batch.rejected_groups, describe_problems(reward_problems))
        unit = self.cfg.learner.num_workers * self.cfg.learner.minibatch_size * self.cfg.learner.minibatches_per_step
        usable = len(batch) // unit * unit
        if usable < len(batch):
            log.warning("iteration %d: %d of %d samples left out to fill whole learner minibatches",
                        iteration, len(batch) - usable, len(batch))
            batch = batch.truncate(usable)
        if usable == 0:
            return batch, [], incomplete
        learner_metrics = self.system.learner.train(batch.shard(self.cfg.learner.num_workers), iteration)
        return batch, learner_metrics, incomplete

    def publish(self):
        self.version += 1
        self.weights = self.system.learner.publish(self.version)
        return self.weights

    def checkpoint(self, iteration: int) -> Path:
        state = {
            "iteration": iteration, "version": self.version, "images_seen": self.images_seen,
            "seed": self.cfg.seed,
            "stat_tracker": self.buffer.stat_tracker.state_dict() if self.buffer.stat_tracker else None,
            "rng": capture_rng(),
            "before": asdict(self.before) | {"grid": None} if self.before is not None else None,
            "records": self.records,
        }
        start = time.perf_counter()
        folder = save_checkpoint(self.run.checkpoints, iteration, self.cfg, self.system.learner, state,
                                 self.cfg.checkpoint.keep_last)
        log.info("checkpoint %s written in %.1f s", folder, time.perf_counter() - start)
        return folder

    def restore(self, point: ResumePoint) -> float:
        """Continue from a checkpoint: learner module and optimizer, driver state, RNG states; the
        restored weights are published so every sampler loads them before its next batch. Returns
        the seconds it took."""
        start = time.perf_counter()
        state = point.state
        digests = self.system.learner.load_checkpoint(point.checkpoint.resolve(), point.checkpoint.name)
        self.version, self.images_seen = int(state["version"]), int(state["images_seen"])
        if self.buffer.stat_tracker is not None and state.get("stat_tracker") is not None:
            self.buffer.stat_tracker.load_state_dict(state["stat_tracker"])
        restore_rng(state["rng"])
        self.records = list(state["records"])
        self.before = EvalResult(**state["before"]) if state.get("before") else None
        self.weights = self.system.learner.publish(self.version)
        seconds = time.perf_counter() - start
        log.info("resumed from %s (iteration %d, policy version %d, weights %s) in %.1f s",
                 point.checkpoint, point.iteration, self.version, digests[0], seconds)
        return seconds

    # ---------------------------------------------------------------------------------- loop
    def train(self, start_iteration: int = 0) -> TrainResult:
        """Iterations `start_iteration` .. cfg.iterations - 1 (a resumed run starts past 0 and
        skips the evaluation before training, which its checkpoint holds)."""
        cfg = self.cfg
        if start_iteration == 0:
            self.before = self.evaluate(0, "before")
        before = after = self.before
        pending: deque = deque()
        next_dispatch = start_iteration
        bar = _progress(cfg, start_iteration)
        for it in range(start_iteration, cfg.iterations):
            start = time.perf_counter()
            while next_dispatch <= min(it + cfg.cluster.max_staleness, cfg.iterations - 1):
                pending.append(self.dispatch(next_dispatch))
                next_dispatch += 1
            rollout = pending.popleft()
            rollout_result = collect(rollout, self.buffer, retries=cfg.cluster.call_retries)
            batch, learner_metrics, incomplete = self.learn(it, rollout_result.problems)
            digests = self.system.learner.digests() if cfg.learner.num_workers > 1 else []
            weights = self.publish() if learner_metrics else None
            self.images_seen += len(rollout.plan.seeds)
            record = iteration_record(
                it, self.version, self.images_seen, rollout_result, batch, learner_metrics, weights, digests,
                incomplete, time.perf_counter() - start,
            )
            self.run.log(record, self.images_seen)
            self.run.add_train_point(self.images_seen, record["train/reward_mean"])
            self.records.append(record)
            _update_bar(bar, record)
            last = it == cfg.iterations - 1
            if cfg.eval.every and (it + 1) % cfg.eval.every == 0 and not last:
                self.evaluate(it + 1, f"iter-{it + 1:06d}")
            if cfg.checkpoint.every and (it + 1) % cfg.checkpoint.every == 0 and not last:
                self.checkpoint(it + 1)
        if bar is not None:
            bar.close()
        if cfg.iterations > start_iteration:
            after = self.evaluate(cfg.iterations, "after")
            self.checkpoint(cfg.iterations)
        self.run.plot()
        return TrainResult(self.run.path, before, after, self.records)


def _progress(cfg: ExperimentConfig, start: int = 0):
    if not cfg.logging.progress_bar or cfg.iterations <= start:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.iterations, initial=start, desc="loop-ray", unit="it", dynamic_ncols=True)


def _update_bar(bar, record: dict) -> None:
    if bar is None:
        return
    bar.set_postfix(reward=f"{record['train/reward_mean']:.3f}", img_s=f"{record['throughput/images_per_s']:.1f}")
    bar.update(1)


# ------------------------------------------------------------------------------------ entry
def train(cfg: ExperimentConfig, address: str | None = None, resume: ResumePoint | None = None) -> TrainResult:
    """Run one experiment on the configured cluster (or a local Ray), or continue one from a
    checkpoint (`resume`); returns its run folder and the before/after evaluations."""
    train_set, val_set = validate_inputs(cfg)
    if resume is not None:
        check_resumable(load_config(resume.checkpoint / "config.yaml"), cfg, resume.checkpoint)
    pin_threads(cfg.cluster.torch_threads)
    started_ray = cluster.connect(cfg, address)
    system = None
    run = None
    try:
        from loop_ray.system.launch.launch import System

        system = System.start(cfg)
        if resume is None:
            run = RunDir.create(cfg)
            print(f"loop-ray: run folder {run.path}", flush=True)
        else:
            run = RunDir.reopen(resume.run_dir, cfg, resume.state["records"], int(resume.state["images_seen"]))
            print(f"loop-ray: resuming {run.path} from {resume.checkpoint.name}", flush=True)
        trainer = Trainer(cfg, system, run, train_set, val_set)
        if resume is not None:
            trainer.restore(resume)
        result = trainer.train(resume.iteration if resume is not None else 0)
        if result.before is not None and result.after is not None and cfg.iterations:
            print("\nheld-out reward per category (before -> after training)")
            print(comparison_table(result.before, result.after), flush=True)
        return result
    finally:
        if run is not None:
            run.close(failed=sys.exc_info()[0] is not None)  # an error on its way out: W&B marks the run failed
        if system is not None:
            system.shutdown()
        if started_ray:
            ray.shutdown()
