"""Reward terms in their own Ray runtime environment and behind a URL, on the real local Ray: the
reward pool starts separate actors for a term with a runtime_env (a package the driver cannot
import, an env var only they have), adds the groups' scores up, replaces a lost one and scores its
chunk again; an http term scores against a real server on 127.0.0.1 with a bearer token that is
written nowhere; and a whole training run uses both."""

import importlib.util
import json
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from scoring_server import ScoringServer, mean_pixel

from loop_ray.cli.train import main
from loop_ray.config import ConfigError, load_config
from loop_ray.rewards import build_reward
from loop_ray.system.launch.launch import start_reward_pool, wait_for_reward_actors
from loop_ray.system.run.validate import validate_inputs

pytestmark = pytest.mark.slow

MODULE = "loop_hidden_reward_t15"
TERM = f"{MODULE}:build"
TOKEN = "tok-3b7d0c5e-not-a-real-secret"

HIDDEN_REWARD = '''
"""A reward that exists only in its actors' runtime_env (py_modules): mean pixel / 255 plus the
value of the env var BONUS, which only that runtime_env sets; NaN for the prompt "bad"."""
import os

import numpy as np


def build():
    bonus = float(os.environ["BONUS"])

    def reward(images, prompts):
        values = np.asarray(images, np.float32).mean(axis=(1, 2, 3)) / 255.0 + bonus
        values[[p == "bad" for p in prompts]] = np.nan
        return values

    return reward
'''


@pytest.fixture
def hidden_package(tmp_path):
    folder = tmp_path / "pkgs" / MODULE
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(textwrap.dedent(HIDDEN_REWARD))
    assert importlib.util.find_spec(MODULE) is None  # the driver cannot import it
    return folder


def _hidden_term(folder, name=TERM, weight=2.0):
    return {"name": name, "weight": weight,
            "runtime_env": {"py_modules": [str(folder)], "env_vars": {"BONUS": "3"}}}


def _chunk(prompts, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, size=(len(prompts), 16, 16, 3), dtype=np.uint8)
    return images, ray.put({"images": images, "prompts": list(prompts), "start": 0})


def _wait_until_dead(actor):
    for _ in range(600):
        try:
            ray.get(actor.ping.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed actor still answers")


def test_term_with_runtime_env_is_scored_by_its_own_actors(ray_session, hidden_package):
    cfg = load_config("configs/debug.yaml", {
        "reward.terms": [{"name": "jpeg_compressibility"}, _hidden_term(hidden_package)],
        "cluster.max_restarts": 0,
    })
    validate_inputs(cfg)  # the term's import path is not imported in the driver
    pool = start_reward_pool(cfg)
    try:
        wait_for_reward_actors(cfg, pool)
        assert len(pool.groups) == 2  # the shared actors, and the term's own
        prompts = ["a red cube", "bad", "a blue ball", "a green cone"]
        images, chunk = _chunk(prompts)
        result, repeated = pool.result(pool.submit(chunk), retries=1)
        assert repeated == 0

        hidden = mean_pixel(images).astype(np.float32) + np.float32(3.0)
        hidden[1] = np.nan
        jpeg = build_reward("jpeg_compressibility")(images, prompts)
        np.testing.assert_allclose(result["parts"][TERM], hidden, rtol=1e-6)
        np.testing.assert_array_equal(result["parts"]["jpeg_compressibility"], jpeg)
        np.testing.assert_allclose(result["rewards"], jpeg + 2.0 * hidden, rtol=1e-6)  # NaN where "bad"
        assert result["problems"] == [f"reward term '{TERM}' returned non-finite values (1 NaN) for 4 images"]

        # the term's actor is lost for good: a fresh one in the same runtime_env scores the chunk again
        ray.kill(pool.groups[1].actors[0], no_restart=True)
        _wait_until_dead(pool.groups[1].actors[0])
        again, repeated = pool.result(pool.submit(chunk), retries=1)
        assert repeated == 1 and pool.groups[1].actors.replaced == 1 and pool.groups[0].actors.replaced == 0
        np.testing.assert_array_equal(again["rewards"], result["rewards"])
    finally:
        pool.kill_all()


def test_reward_that_cannot_start_in_its_runtime_env_is_named(ray_session, hidden_package):
    missing = "loop_hidden_reward_missing_t15:build"
    cfg = load_config("configs/debug.yaml", {
        "reward.terms": [{"name": "jpeg_compressibility"}, _hidden_term(hidden_package, name=missing)],
    })
    pool = start_reward_pool(cfg)
    try:
        with pytest.raises(ConfigError) as err:
            wait_for_reward_actors(cfg, pool)
    finally:
        pool.kill_all()
    message = str(err.value)
    assert message.startswith(f"reward.terms.1 ({missing}): the reward actor did not start in its runtime_env: ")
    assert "cannot import 'loop_hidden_reward_missing_t15'" in message and "\n" not in message


def test_missing_runtime_env_folder_is_refused_by_key(tmp_path):
    cfg = load_config("configs/debug.yaml", {"reward.terms": [_hidden_term(tmp_path / "nope")]})
    with pytest.raises(ConfigError, match=r"reward\.terms\.0\.runtime_env\.py_modules\.0: .*nope' does not exist"):
        validate_inputs(cfg)


def test_http_term_through_the_reward_pool(ray_session, monkeypatch):
    """The reward actor reaches the server on 127.0.0.1 with the driver's token; a 500 is retried
    inside the call (each image scored once); a server that always fails makes the images invalid
    with the URL and the batch named, through the invalid-reward machinery."""
    monkeypatch.setenv("LOOP_TEST_SCORER_TOKEN", TOKEN)
    with ScoringServer(token=TOKEN, plan=["500"]) as server:
        kwargs = {"url": server.url, "token_env": "LOOP_TEST_SCORER_TOKEN", "backoff": 0.0, "retries": 1}
        cfg = load_config("configs/debug.yaml", {"reward.terms": [{"name": "http", "kwargs": kwargs}]})
        pool = start_reward_pool(cfg)
        try:
            wait_for_reward_actors(cfg, pool)
            prompts = [f"prompt {i}" for i in range(6)]
            images, chunk = _chunk(prompts)
            result, _ = pool.result(pool.submit(chunk), retries=1)
            np.testing.assert_array_equal(result["rewards"], mean_pixel(images).astype(np.float32))
            assert result["problems"] == [] and server.unauthorized == 0
            assert server.calls == 2 and server.scored_prompts == prompts  # the 500, then each image once

            server.plan += ["500", "500"]  # both tries of the next call fail
            result, _ = pool.result(pool.submit(chunk), retries=1)
            assert np.isnan(result["rewards"]).all()
            (problem,) = result["problems"]
            assert problem == (
                f"reward term 'http' raised HttpRewardError: http reward {server.url}: prompts 0..5 of the 6 in "
                "this call: HTTP 500 Internal Server Error: '{\"error\": \"model not loaded yet\"}' (failed 2 tries)"
            )
        finally:
            pool.kill_all()


def _files_text(folder):
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file())


def test_training_run_with_an_http_term_and_a_runtime_env_term(ray_session, hidden_package, tmp_path, monkeypatch,
                                                               capsys, caplog):
    """Both kinds of term in one `loop-ray train`: every planned group is learned from, every image
    is scored by the server exactly once (one call failed and was retried), and the token is
    nowhere in the run folder (W&B's offline files in it included), the output or the Ray
    session's logs."""
    monkeypatch.setenv("LOOP_TEST_SCORER_TOKEN", TOKEN)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # W&B's files into the run folder
    with ScoringServer(token=TOKEN, plan=["500"]) as server:
        terms = [{"name": "http", "kwargs": {"url": server.url, "token_env": "LOOP_TEST_SCORER_TOKEN",
                                             "backoff": 0.0}},
                 _hidden_term(hidden_package, weight=0.5)]
        args = ["--config", "configs/debug.yaml", "--set", f"output_dir={tmp_path / 'runs'}",
                "--set", f"reward.terms={json.dumps(terms)}", "--set", "iterations=2",
                "--set", "eval.max_prompts=1", "--set", "eval.images_per_prompt=1",
                "--set", "logging.tensorboard=false", "--set", "logging.wandb={project: t, mode: offline}"]
        assert main(args) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert list(run.glob("wandb/offline-run-*/run-*.wandb"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["train/samples_learned"] for r in train] == [8, 8] and all(r["train/failed_calls"] == 0 for r in train)
    for r in train:
        assert r["train/term/http"] == pytest.approx(r["train/term/" + TERM] - 3.0, abs=1e-5)  # the same images
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["eval/images"] for e in evals] == [1, 1]
    assert len(server.scored_prompts) == 2 * 8 + 2 and server.calls == len(server.batches) + 1
    assert server.unauthorized == 0

    out = capsys.readouterr()
    ray_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for text in (_files_text(run), out.out, out.err, caplog.text, _files_text(ray_logs)):
        assert TOKEN not in text
