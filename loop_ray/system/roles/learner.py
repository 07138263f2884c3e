"""LearnerGroup: `learner.num_workers` Ray actors forming one torch.distributed group, each with a
DeepSpeed engine around its policy's UNet (data parallel; ZeRO stage from the config).

Rank 0 opens the group's rendezvous store (a torch TCPStore) on a port the OS gives it, so no
other process can take the port between choosing and binding it, and the other ranks join it
there (127.0.0.1 when all ranks share a node, else rank 0's node address); the backend is gloo on CPUs and NCCL on GPUs unless
`learner.backend` says otherwise. Each iteration every worker pulls its shard of the samples from
the object store, runs `update_on_shard`, and rank 0 publishes the new weights once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import ray
import torch

from loop_ray.config import ExperimentConfig
from loop_ray.filehash import hash_file, write_hashed
from loop_ray.system.launch.cluster import actor_options, role_resources
from loop_ray.system.roles.waits import wait_for
from loop_ray.system.roles.weights import ObjectStoreWeightSync, PublishedWeights
from loop_ray.training.deepspeed_engine import hashed_saves
from loop_ray.training.forward_update import OldPolicy, update_forward_on_shard
from loop_ray.training.update import (
    build_learner_policy,
    grad_accum_steps,
    num_trainable_steps,
    update_on_shard,
)
from loop_ray.trajectory import TrajectoryBatch
from loop_ray.utils import pin_threads


def state_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's keys and exact values (ranks in sync have equal digests)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class LearnerWorker:
    def __init__(self, cfg: dict, rank: int, world_size: int):
        self.cfg = ExperimentConfig.model_validate(cfg)
        pin_threads(self.cfg.cluster.torch_threads)
        self.rank, self.world_size = rank, world_size
        self.use_gpu = self.cfg.learner.num_gpus_per_worker > 0 and torch.cuda.is_available()
        self.engine = None
        self.policy = None
        self.store = None
        # a collective waiting on a lost rank gives up after this long (the driver stops the
        # group at the first rank error well before)
        self.group_timeout = timedelta(seconds=self.cfg.cluster.call_timeout_s)
        self.old = None  # DiffusionNFT's old policy theta_old (loop_ray.training.forward_update)

    def rendezvous_info(self) -> tuple[str, int, str]:
        """(node address, store port, node id) of this worker; rank 0's are the group's. Rank 0
        opens the group's TCPStore here, bound to port 0 (the OS picks a free one and it stays
        bound), and hands out its port; the other ranks return port 0."""
        port = 0
        if self.rank == 0:
            self.store = torch.distributed.TCPStore("0.0.0.0", 0, self.world_size, is_master=True,
                                                    timeout=self.group_timeout, wait_for_workers=False)
            port = self.store.port
        return ray.util.get_node_ip_address(), port, ray.get_runtime_context().get_node_id()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group through rank 0's store, build the policy and its DeepSpeed engine."""
        backend = self.cfg.learner.backend
        if backend == "auto":
            backend = "nccl" if self.use_gpu else "gloo"
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",  # Ray shows each worker only its own GPU
        )
        if self.rank != 0:
            self.store = torch.distributed.TCPStore(master_addr, master_port, self.world_size, is_master=False,
                                                    timeout=self.group_timeout)
        torch.distributed.init_process_group(
            backend, store=self.store, rank=self.rank, world_size=self.world_size, timeout=self.group_timeout,
        )
        from loop_ray.training.deepspeed_engine import build_engine

        self.policy = build_learner_policy(self.cfg, "cuda" if self.use_gpu else "cpu")
        num_trainable = num_trainable_steps(self.cfg, self.policy)
        self.engine = build_engine(self.cfg, self.policy, grad_accum_steps(self.cfg, num_trainable))
        self.weight_sync = ObjectStoreWeightSync()
        if self.cfg.algorithm.objective == "nft":
            self.old = OldPolicy(self.policy, self.cfg)
        return self.rank

    def train(self, pieces: list, advantages: torch.Tensor, iteration: int) -> dict:
        """Update on this worker's shard: `pieces` = [(ObjectRef of a TrajectoryBatch, rows)],
        `advantages` aligned with the concatenated rows."""
        start = time.perf_counter()
        batches = ray.get([ref for ref, _ in pieces])
        batch = TrajectoryBatch.concat([b.select(rows) for b, (_, rows) in zip(batches, pieces)])
        fetch_seconds = time.perf_counter() - start
        if len(batch) != len(advantages):
            raise ValueError(f"learner {self.rank}: {len(batch)} samples but {len(advantages)} advantages")
        seed = np.random.SeedSequence([self.cfg.seed, iteration, self.rank]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        self.engine.train()
        if self.cfg.algorithm.objective != "policy_gradient":
            metrics = update_forward_on_shard(self.engine, self.policy, batch, advantages, self.cfg, generator, self.old)
        else:
            metrics = update_on_shard(self.engine, self.policy, batch, advantages, self.cfg, generator)
        metrics.update(rank=self.rank, fetch_seconds=fetch_seconds)
        return metrics

    def publish(self, version: int) -> PublishedWeights | None:
        """Rank 0 puts the sampling policy's trainable weights in the object store (theta_old for
        DiffusionNFT, theta otherwise); the others return None."""
        if self.rank != 0:
            return None
        state = self.old.publishable() if self.old is not None else self.policy.trainable_state_dict()
        return self.weight_sync.publish(state, version)

    def weights_digest(self) -> str:
        return state_digest(self.policy.trainable_state_dict())

    def save_checkpoint(self, folder: str, tag: str) -> dict[str, dict]:
        """DeepSpeed's checkpoint (module, optimizer and its ZeRO partitions) under folder/deepspeed
        (collective: every rank calls it); rank 0 also writes folder/trainable.pt and folder/unet, and
        makes the folder a whole pipeline: model_index.json and links to the frozen parts, which it
        writes once per run beside the checkpoints (checkpoint.link_frozen_parts).
        Returns the size and SHA-256 of each file this rank wrote (path relative to folder -> entry),
        hashed as it was written; the diffusers UNet, which diffusers writes itself, is hashed here
        right after, on the node that wrote it."""
        folder_path = Path(folder)
        written: dict[str, dict] = {}
        with hashed_saves(self.engine, folder, written):
            self.engine.save_checkpoint(str(folder_path / "deepspeed"), tag=tag)
        if self.rank == 0:
            state = self.policy.trainable_state_dict()
            written["trainable.pt"] = write_hashed(folder_path / "trainable.pt", lambda f: torch.save(state, f))
            if self.old is not None:  # theta_old and its step count: exact resume of DiffusionNFT
                old = self.old.state_dict()
                written["old_policy.pt"] = write_hashed(folder_path / "old_policy.pt", lambda f: torch.save(old, f))
            from loop_ray.diffusion.ddim.stable_diffusion import plain_unet

            name = getattr(self.policy, "network_name", "unet")  # a flow policy's is "transformer"
            plain_unet(self.policy.unet).save_pretrained(folder_path / name)  # diffusers format
            for p in sorted((folder_path / name).rglob("*")):
                if p.is_file():
                    written[p.relative_to(folder_path).as_posix()] = hash_file(p)
            from loop_ray.diffusion.pipeline_parts import write_frozen_parts
            from loop_ray.training.checkpoint import link_frozen_parts

            kind = self.cfg.model.kind
            written.update(link_frozen_parts(folder_path, lambda out: write_frozen_parts(self.policy, kind, out)))
        return written

    def load_checkpoint(self, folder: str, tag: str) -> str:
        """Restore module and optimizer state from a checkpoint (collective); returns the weights'
        digest so the driver can check every rank loaded the same."""
        path, _ = self.engine.load_checkpoint(
            str(Path(folder) / "deepspeed"), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"learner {self.rank}: no DeepSpeed checkpoint {tag!r} under {folder}/deepspeed")
        if self.old is not None:
            old_path = Path(folder) / "old_policy.pt"
            if not old_path.is_file():
                raise FileNotFoundError(f"learner {self.rank}: {old_path} is missing (algorithm.objective=nft needs it)")
            self.old.load_state_dict(torch.load(old_path, map_location="cpu", weights_only=True))
        return self.weights_digest()


RemoteLearnerWorker = ray.remote(LearnerWorker)


class LearnerGroupError(RuntimeError):
    """A learner rank failed or did not answer in time; the whole group was stopped."""


class LearnerGroup:
    """Driver-side handle: starts the workers, forms the group, fans calls out and gathers them.
    Every call has a deadline (`cluster.startup_timeout_s` to form the group,
    `cluster.call_timeout_s` after); at the first rank that fails or misses it, every rank is
    stopped (the others would wait on it in a collective) and LearnerGroupError raised."""

    def __init__(self, cfg: ExperimentConfig, generation: int = 0):
        self.cfg, self.generation = cfg, generation
        cfg_dict = cfg.model_dump(mode="json")
        n = cfg.learner.num_workers
        opts = actor_options(role_resources(cfg)["learner"], cfg.cluster.torch_threads)
        self.workers = [RemoteLearnerWorker.options(**opts).remote(cfg_dict, rank, n) for rank in range(n)]
        startup = cfg.cluster.startup_timeout_s
        infos = self._gather([w.rendezvous_info.remote() for w in self.workers], "start-up", startup)
        addr, port, _ = infos[0]
        if len({node for _, _, node in infos}) == 1:
            addr = "127.0.0.1"
        self._gather([w.setup.remote(addr, port) for w in self.workers], "process group setup", startup)

    def _gather(self, refs: list, what: str, timeout_s: float | None = None) -> list:
        try:
            return wait_for(refs, self.cfg.cluster.call_timeout_s if timeout_s is None else timeout_s,
                            f"learner {what}", self.workers)
        except ray.exceptions.RayError as err:
            self.shutdown()
            raise LearnerGroupError(f"learner group stopped: {what} failed on a rank: "
                                    f"{str(err).splitlines()[0]}") from err

    def train(self, shards: list[dict], iteration: int) -> list[dict]:
        """One learner phase; returns each rank's metrics."""
        if len(shards) != len(self.workers):
            raise ValueError(f"{len(shards)} shards for {len(self.workers)} learner workers")
        refs = [w.train.remote(s["pieces"], s["advantages"], iteration) for w, s in zip(self.workers, shards)]
        return self._gather(refs, f"train (iteration {iteration})")

    def publish(self, version: int) -> PublishedWeights:
        handle = self._gather([self.workers[0].publish.remote(version)], f"publish (version {version})")[0]
        return dataclasses.replace(handle, generation=self.generation)

    def digests(self) -> list[str]:
        return self._gather([w.weights_digest.remote() for w in self.workers], "weights digest")

    def save_checkpoint(self, folder: str | Path, tag: str) -> dict[str, dict]:
        """Every rank's part of the checkpoint; returns the entries of all the files they wrote."""
        written: dict[str, dict] = {}
        for part in self._gather([w.save_checkpoint.remote(str(folder), tag) for w in self.workers], "checkpoint save"):
            written.update(part)
        return written

    def load_checkpoint(self, folder: str | Path, tag: str) -> list[str]:
        digests = self._gather([w.load_checkpoint.remote(str(folder), tag) for w in self.workers], "checkpoint load")
        if len(set(digests)) != 1:
            raise RuntimeError(f"learner ranks loaded different weights from {folder}: {digests}")
        return digests

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
