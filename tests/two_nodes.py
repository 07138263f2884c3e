"""A two-node Ray cluster on this machine, a run on it, and the second node's raylet killed
mid-run; run as its own process by tests/system/test_system_two_nodes.py (a process joins one Ray
only, and the other system tests hold the in-process one). The cluster has its own temp dir
(TWO_NODES_TMP) and ports the OS picks; its Ray processes are stopped at the end.

`python two_nodes.py OUT_DIR` writes OUT_DIR/result.json: the run's train records, the actors
replaced, and the node each sampler ran on before and after the kill."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_args(resources: dict, **extra) -> dict:
    return {"num_cpus": 1, "resources": resources, "include_dashboard": False,
            "object_store_memory": 150 * 2**20, **extra}


def main(out: Path) -> None:
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from loop_ray.config import load_config
    from loop_ray.prompts import load_prompts
    from loop_ray.system.launch.launch import System
    from loop_ray.system.roles.waits import actor_info
    from loop_ray.system.run.driver import Trainer
    from loop_ray.system.run.run_dir import RunDir

    root = Path(os.environ.get("TWO_NODES_TMP", out))
    # the head holds the learner and the reward actor, the second node the sampler
    cluster = Cluster(initialize_head=True, head_node_args=_node_args(
        {"head_slot": 1}, temp_dir=str(root), gcs_server_port=_free_port()))
    system = None
    try:
        second = cluster.add_node(**_node_args({"sampler_slot": 1}))
        ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
        cfg = load_config("configs/debug.yaml", {
            "output_dir": str(out), "iterations": 3, "eval.max_prompts": 1, "eval.images_per_prompt": 1,
            "logging.tensorboard": False, "cluster.sampler_resources": {"sampler_slot": 1},
            "cluster.reward_resources": {"head_slot": 0.25}, "learner.resources": {"head_slot": 0.25},
            "cluster.startup_timeout_s": 300, "cluster.ping_timeout_s": 5,
        })
        nodes: dict[str, str] = {}

        class NodeKillingTrainer(Trainer):
            """Kills the second node's raylet right after iteration 1's calls were sent, then adds
            a node with room for a sampler (as an autoscaler would)."""

            killed = False

            def dispatch(self, iteration: int):
                rollout = super().dispatch(iteration)
                if iteration == 1 and not self.killed:
                    self.killed = True
                    nodes["before"] = actor_info(self.system.samplers[0]).get("Address", {}).get("NodeID", "")
                    nodes["second"] = second.node_id
                    second.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.kill()
                    cluster.add_node(wait=False, **_node_args({"sampler_slot": 1}))
                return rollout

        system = System.start(cfg)
        run = RunDir.create(cfg)
        try:
            trainer = NodeKillingTrainer(cfg, system, run, load_prompts(cfg.prompts.train),
                                         load_prompts(cfg.prompts.val))
            trainer.train()
        finally:
            run.close()
        nodes["after"] = actor_info(system.samplers[0]).get("Address", {}).get("NodeID", "")
        records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        result = {"records": [r for r in records if r["kind"] == "train"], "nodes": nodes,
                  "replaced": system.samplers.replaced + system.reward_pool.replaced}
        (out / "result.json").write_text(json.dumps(result))
    finally:
        if system is not None:
            system.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
