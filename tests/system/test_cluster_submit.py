"""The documented cluster path for real: `ray start --head` on loopback (token authentication on,
dashboard/job API on 127.0.0.1), then `cluster/submit.sh configs/debug.yaml` (`ray job submit` with
cluster/runtime_env.yaml: the repository uploaded as working_dir, the entrypoint run there), a tiny
run, and the run folder it leaves. The head is this test's own: its own session, temp dir and ports,
stopped by signalling its process tree (`ray stop` has no way to aim at one cluster and would stop every
Ray on the machine), and the teardown checks that none of its processes are left.

Nothing here touches this process's environment (RAY_ADDRESS, RAY_AUTH_*): the head, `submit.sh` and
`ray job logs` get their own, so the in-process Ray of the other system tests is not affected."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from loop_ray.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# the virtual environment's bin folder (ray, python): <repo>/.venv/bin under `make test`. Not resolved:
# .venv/bin/python is a symlink to the base interpreter, whose folder has no ray.
VENV_BIN = Path(sys.executable).parent
MARK = "LOOP_RAY_TEST_HEAD"  # in the environment of every process of the head, to find them all
# our variables must win over whatever the calling shell has (another cluster's address or token)
_FOREIGN = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
            "RAY_JOB_SUBMIT_FLAGS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ninja_shim(folder: Path) -> list[str]:
    """torch JIT-builds DeepSpeed's CPU shared-memory op with the `ninja` on PATH into the shared
    ~/.cache/torch_extensions. ninja 1.11 (a system one) and 1.13 (.venv/bin's) hash build commands
    differently, so a build by one looks stale to the other and is redone (1-2 min on 2 cores), here and
    then again in every later learner test. So the job finds the ninja this pytest process finds."""
    ours = shutil.which("ninja")
    if ours is None or not (VENV_BIN / "ninja").exists() or Path(ours) == VENV_BIN / "ninja":
        return []
    folder.mkdir()
    (folder / "ninja").symlink_to(ours)
    return [str(folder)]


@dataclass
class Head:
    url: str  # job API, http://127.0.0.1:<dashboard port>
    gcs_port: int
    token: str
    env: dict[str, str]  # environment for `ray job` / submit.sh against this head (RAY_ADDRESS not set)
    log: Path
    marker: str

    def request(self, path: str, *, auth: bool = True) -> dict:
        req = urllib.request.Request(self.url + path)
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def job_status(self, submission_id: str) -> str:
        return self.request(f"/api/jobs/{submission_id}")["status"]

    def job_logs(self, submission_id: str) -> str:
        p = subprocess.run([str(VENV_BIN / "ray"), "job", "logs", "--address", self.url, submission_id],
                           check=False, env=self.env, capture_output=True, text=True, timeout=60)
        return p.stdout + p.stderr


def _head_processes(pgid: int, marker: str, known: list[psutil.Process]) -> list[psutil.Process]:
    """Every live process of the head: the tree seen earlier, its process group, and anything whose
    environment carries the marker (a job driver starts its own session)."""
    found = {p.pid: p for p in known if _alive(p)}
    me = os.getpid()
    for p in psutil.process_iter():
        if p.pid == me or p.pid in found:
            continue
        try:
            if os.getpgid(p.pid) == pgid or p.environ().get(MARK) == marker:
                found[p.pid] = p
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return [p for p in found.values() if _alive(p)]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop_head(proc: subprocess.Popen, marker: str) -> list[str]:
    """SIGTERM to `ray start --block` (it stops the processes it started), then SIGKILL for anything
    of the head still there. Returns what is left (nothing, normally)."""
    pgid = proc.pid  # start_new_session: the head leads its own process group
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    tree = _head_processes(pgid, marker, tree)  # before anything dies and is re-parented
    proc.terminate()
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive + _head_processes(pgid, marker, []):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while (left := _head_processes(pgid, marker, tree)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return [f"{p.pid} {_name(p)}" for p in left]


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120] or p.name()
    except psutil.Error:
        return "?"


@pytest.fixture
def ray_head():
    """A Ray head of this test's own, stopped and checked gone at the end."""
    # Ray's unix sockets live under the temp dir; AF_UNIX paths are limited to 107 bytes, and pytest's
    # tmp_path plus Ray's session folder names would pass that, so a short folder in /tmp
    tmp = Path(tempfile.mkdtemp(prefix="lr-head-", dir="/tmp" if os.path.isdir("/tmp") else None))
    token = secrets.token_hex(32)
    token_file = tmp / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    env.update({
        "PATH": os.pathsep.join([*_ninja_shim(tmp / "bin"), str(VENV_BIN), env.get("PATH", "")]),
        # token authentication on, with this head's own token (not ~/.ray/auth_token): the head
        # enforces it, and `ray job ...` sends it only with RAY_AUTH_MODE=token
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        MARK: str(tmp),
    })
    gcs_port, dashboard_port = _free_port(), _free_port()
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port),
        "--num-cpus", "2", "--object-store-memory", str(300 * 2**20), "--temp-dir", str(tmp / "ray"),
        # every port this head opens is a free one, so it collides with no other Ray on the machine
        "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
        "--dashboard-agent-grpc-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port()),
        "--metrics-export-port", str(_free_port()), "--node-manager-port", str(_free_port()),
        "--object-manager-port", str(_free_port()),
    ]
    log = tmp / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    head = Head(f"http://127.0.0.1:{dashboard_port}", gcs_port, token, env, log, str(tmp))
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
            try:
                head.request("/api/jobs/")
                break
            except urllib.error.HTTPError as err:
                if err.code in (401, 403):  # up, but our token is not accepted: waiting will not help
                    pytest.fail(f"the job API refused the head's own token: {err}")
                if time.monotonic() > deadline:
                    pytest.fail(f"the job API did not come up in 90 s ({err}):\n{log.read_text()[-5000:]}")
                time.sleep(1)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"the job API did not come up in 90 s:\n{log.read_text()[-5000:]}")
                time.sleep(1)
        yield head
    finally:
        left = _stop_head(proc, str(tmp))
        # on any address: Ray 2.60 turns --node-ip-address 127.0.0.1 into the machine's own address
        listening = [c.laddr for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port in (gcs_port, dashboard_port)]
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still running: {left}"
        assert not listening, f"something still listens on the head's GCS / dashboard port: {listening}"


def test_submit_sh_runs_the_debug_config_on_a_ray_head(ray_head, tmp_path):
    environ_before = {k: os.environ.get(k) for k in _FOREIGN}

    # the job API refuses a request without the token
    with pytest.raises(urllib.error.HTTPError) as refused:
        ray_head.request("/api/jobs/", auth=False)
    assert refused.value.code == 401

    out = tmp_path / "runs"  # absolute: a relative output_dir would land in the job's unpacked working_dir
    submission_id = f"loop-ray-test-{secrets.token_hex(4)}"
    overrides = [
        "iterations=1", f"output_dir={out}", "sampling.prompts_per_iteration=1", "algorithm.inner_epochs=1",
        "eval.max_prompts=1", "eval.images_per_prompt=1", "eval.grid_prompts=1", "logging.tensorboard=false",
    ]
    env = dict(ray_head.env, RAY_ADDRESS=ray_head.url,
               RAY_JOB_SUBMIT_FLAGS=f"--no-wait --submission-id {submission_id}")
    args = [str(REPO / "cluster" / "submit.sh"), "configs/debug.yaml"]
    for item in overrides:
        args += ["--set", item]
    submit = subprocess.run(args, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, f"submit.sh failed:\n{submit.stdout}\n{submit.stderr}"

    deadline, status = time.monotonic() + 420, "PENDING"
    while status in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        time.sleep(2)
        status = ray_head.job_status(submission_id)
    if status != "SUCCEEDED":
        logs = ray_head.job_logs(submission_id)
        pytest.fail(f"job {submission_id} ended {status}; `ray job logs {submission_id}`:\n{logs}")

    runs = list(out.iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("debug-"), runs
    run = runs[0]
    cfg = load_config(run / "config.yaml")
    assert cfg.iterations == 1 and cfg.output_dir == str(out)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [0] and train[0]["train/samples_learned"] == 4
    ckpt = run / "checkpoints" / "iter-000001"
    assert json.loads((ckpt / "driver_state.json").read_text())["iteration"] == 1
    assert (ckpt / "trainable.pt").stat().st_size > 0

    assert {k: os.environ.get(k) for k in _FOREIGN} == environ_before  # nothing leaked into this process
