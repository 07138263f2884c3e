"""`loop-ray train --config CONFIG [--set key=value ...] [--address ADDR] [--iterations N]`

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

import argparse
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray

from loop_ray.algorithms import StatTracker
from loop_ray.config import ConfigError, ExperimentConfig, load_config
from loop_ray.prompts import PromptSet
from loop_ray.system import cluster
from loop_ray.system.buffer import TrajectoryBuffer
from loop_ray.system.checkpoint import save_checkpoint
from loop_ray.system.evaluation import EvalResult, comparison_table, evaluate
from loop_ray.system.metrics import iteration_record
from loop_ray.system.plan import plan_eval, plan_iteration
from loop_ray.system.rollout import collect, dispatch
from loop_ray.system.run_dir import RunDir
from loop_ray.system.validate import validate_inputs
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
        tracker = None
        if cfg.algorithm.advantage == "stat_tracker":
            a = cfg.algorithm
            tracker = StatTracker(a.stat_tracker_buffer, a.stat_tracker_min_count, a.std_eps)
        self.buffer = TrajectoryBuffer(cfg.sampling.k, cfg.algorithm.advantage, cfg.algorithm.std_eps, tracker)
        self.version, self.weights, self.images_seen = 0, None, 0
        self.records: list[dict] = []

    # ------------------------------------------------------------------------------- pieces
    def evaluate(self, iteration: int, label: str) -> EvalResult:
        grid = self.run.path / "eval" / f"{label}.png"
        result = evaluate(self.cfg, self.eval_plan, self.system.samplers, self.system.reward_pool,
                          self.version, self.weights, grid)
        record = {"kind": "eval", "label": label, "iteration": iteration, "version": self.version,
                  "images_seen": self.images_seen, **result.record()}
        self.run.log(record, self.images_seen)
        self.run.add_eval_point(self.images_seen, result.mean)
        self.records.append(record)
        return result

    def dispatch(self, iteration: int):
        plan = plan_iteration(self.cfg, self.train_set, iteration)
        return dispatch(self.system.samplers, self.system.reward_pool, plan, self.version, self.weights,
                        self.cfg.reward.batch_size)

    def learn(self, iteration: int):
        """Take the complete, fresh-enough groups from the buffer and run the learner on them."""
        batch = self.buffer.take(self.version, self.cfg.cluster.max_staleness)
        incomplete = self.buffer.clear()  # a group still incomplete after collect never completes
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
        }
        return save_checkpoint(self.run.checkpoints, iteration, self.cfg, self.system.learner, state,
                               self.cfg.checkpoint.keep_last)

    # ---------------------------------------------------------------------------------- loop
    def train(self) -> TrainResult:
        cfg = self.cfg
        before = self.evaluate(0, "before")
        pending: deque = deque()
        next_dispatch = 0
        bar = _progress(cfg)
        after = before
        for it in range(cfg.iterations):
            start = time.perf_counter()
            while next_dispatch <= min(it + cfg.cluster.max_staleness, cfg.iterations - 1):
                pending.append(self.dispatch(next_dispatch))
                next_dispatch += 1
            rollout = pending.popleft()
            rollout_result = collect(rollout, self.buffer)
            batch, learner_metrics, incomplete = self.learn(it)
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
        if cfg.iterations:
            after = self.evaluate(cfg.iterations, "after")
            self.checkpoint(cfg.iterations)
        self.run.plot()
        return TrainResult(self.run.path, before, after, self.records)


def _progress(cfg: ExperimentConfig):
    if not cfg.logging.progress_bar or not cfg.iterations:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.iterations, desc="loop-ray", unit="it", dynamic_ncols=True)


def _update_bar(bar, record: dict) -> None:
    if bar is None:
        return
    bar.set_postfix(reward=f"{record['train/reward_mean']:.3f}", img_s=f"{record['throughput/images_per_s']:.1f}")
    bar.update(1)


# ------------------------------------------------------------------------------------ entry
def train(cfg: ExperimentConfig, address: str | None = None) -> TrainResult:
    """Run one experiment on the configured cluster (or a local Ray); returns its run folder and
    the before/after evaluations."""
    train_set, val_set = validate_inputs(cfg)
    pin_threads(cfg.cluster.torch_threads)
    started_ray = cluster.connect(cfg, address)
    system = None
    run = None
    try:
        from loop_ray.system.launch import System

        system = System.start(cfg)
        run = RunDir.create(cfg)
        print(f"loop-ray: run folder {run.path}", flush=True)
        result = Trainer(cfg, system, run, train_set, val_set).train()
        if result.before is not None and result.after is not None and cfg.iterations:
            print("\nheld-out reward per category (before -> after training)")
            print(comparison_table(result.before, result.after), flush=True)
        return result
    finally:
        if run is not None:
            run.close()
        if system is not None:
            system.shutdown()
        if started_ray:
            ray.shutdown()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loop-ray train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML (e.g. configs/toy.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted-key override")
    p.add_argument("--address", default=None, help="Ray cluster address (else cluster.address / RAY_ADDRESS / local)")
    p.add_argument("--iterations", type=int, default=None, help="override the config's iterations")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides = list(args.set) + ([f"iterations={args.iterations}"] if args.iterations is not None else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, overrides)
        train(cfg, address=args.address)
    except ConfigError as err:
        print(f"loop-ray train: {err}", file=sys.stderr)
        return 2
    return 0

