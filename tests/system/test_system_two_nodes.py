"""A lost node: a two-node Ray cluster on this machine (the learner and the reward actor on the
head, the sampler on the second node), the second node's raylet killed with a sampler call in
flight, a node with room for a sampler added. The sampler is replaced on the new node, its call
sent again, and the run finishes with every planned group learned once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parents[1]


def test_run_survives_the_loss_of_the_sampler_node(tmp_path):
    # Ray's unix sockets live under the temp dirs; AF_UNIX paths are limited to 107 bytes
    short = Path(tempfile.mkdtemp(prefix="lr-2n-", dir="/tmp" if os.path.isdir("/tmp") else None))
    env = {**os.environ, "TWO_NODES_TMP": str(short), "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(TESTS / "two_nodes.py"), str(tmp_path)], env=env,
                            cwd=TESTS.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=900)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its Ray is left
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(short) in " ".join(p.info["cmdline"] or [])]
        shutil.rmtree(short, ignore_errors=True)
    assert proc.returncode == 0, output[-6000:]
    assert not left, f"processes of the two-node cluster still running: {left}"
    result = json.loads((tmp_path / "result.json").read_text())
    records = result["records"]
    assert [r["iteration"] for r in records] == [0, 1, 2]  # each iteration learned once
    assert [r["train/groups_learned"] for r in records] == [2, 2, 2]
    assert [r["train/failed_calls"] for r in records] == [0, 0, 0]
    assert records[1]["faults/sampler_jobs_regenerated"] >= 1
    assert result["replaced"] == 1
    nodes = result["nodes"]
    assert nodes["before"] == nodes["second"] and nodes["after"] not in ("", nodes["second"])
