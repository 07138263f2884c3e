"""The `http` reward against real HTTP servers on 127.0.0.1 started by the tests (tests/scoring_server.py
and examples/http_scorer.py): the wire format both ways, retries that score every image exactly
once, every kind of bad answer named with the URL and the batch, the bearer token kept out of
everything written."""

import importlib.util
import logging
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scoring_server import ScoringServer, mean_pixel

from loop_ray.config import ConfigError, dump_config, load_config
from loop_ray.rewards import build_reward
from loop_ray.rewards.composite import CompositeReward
from loop_ray.rewards.http import (
    BadAnswer,
    HttpRewardError,
    backoff_delays,
    decode_request,
    encode_request,
    parse_scores,
    token_env_values,
)

PROMPTS = [f"prompt {i}" for i in range(8)]
TOKEN = "tok-9f1c2a7e-not-a-real-secret"


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 12, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_scores_every_batch_from_a_real_server(encoding):
    images = _images(7)
    with ScoringServer() as server:
        reward = build_reward("http", url=server.url, batch_size=3, encoding=encoding)
        scores = reward(images, PROMPTS[:7])
    assert scores.dtype == np.float32 and scores.shape == (7,)
    np.testing.assert_array_equal(scores, mean_pixel(images).astype(np.float32))
    assert server.calls == 3 and server.encodings == [encoding] * 3  # batches of 3, 3 and 1
    assert server.scored_prompts == PROMPTS[:7]
    np.testing.assert_array_equal(np.concatenate(server.batches), images)  # lossless both ways


def test_wire_format_round_trip():
    images = _images(2)
    for encoding in ("png", "raw"):
        body = encode_request(images, ["a", "b"], encoding)
        assert body["shape"] == [2, 16, 12, 3] and body["encoding"] == encoding and body["prompts"] == ["a", "b"]
        back, prompts = decode_request(body)
        np.testing.assert_array_equal(back, images)
        assert prompts == ["a", "b"]
    assert isinstance(encode_request(images, ["a", "b"], "raw")["images"], str)  # one base64 string
    assert len(encode_request(images, ["a", "b"], "png")["images"]) == 2  # one PNG per image


def test_a_failed_call_is_retried_and_each_image_is_scored_once(caplog):
    images = _images(8)
    with ScoringServer(plan=["ok", "500"]) as server:
        reward = build_reward("http", url=server.url, batch_size=4, retries=2, backoff=0.0)
        with caplog.at_level(logging.WARNING, logger="loop_ray.rewards.http"):
            scores = reward(images, PROMPTS)
    np.testing.assert_array_equal(scores, mean_pixel(images).astype(np.float32))
    assert server.calls == 3  # batch 0, batch 1 refused with 500, batch 1 again
    assert Counter(server.scored_prompts) == Counter(PROMPTS) and len(server.scored_prompts) == 8
    assert f"http reward {server.url}: prompts 4..7 of the 8 in this call: HTTP 500" in caplog.text


@pytest.mark.parametrize(
    "mode, reason",
    [
        ("500", "HTTP 500 Internal Server Error: '{\"error\": \"model not loaded yet\"}'"),
        ("hang", "no answer within the timeout of 0.3 s"),
        ("short", "the answer has 3 scores for 4 images"),
        ("nan", "score 2 is NaN, not a finite number (1 of 4 scores)"),
        ("notjson", "the answer is not JSON: '<html>scores</html>'"),
    ],
)
def test_bad_answers_are_retried_then_reject_the_call_naming_url_and_batch(mode, reason):
    """The second batch fails both tries: the composite marks every image of the call invalid
    (the groups are rejected) and the problem names the URL, the prompt indices and the cause."""
    reward = None
    with ScoringServer(plan=["ok", mode, mode], hang_seconds=10) as server:
        kwargs = {"url": server.url, "batch_size": 4, "retries": 1, "backoff": 0.0, "timeout": 0.3}
        reward = CompositeReward([("http", 1.0, kwargs)])
        scores = reward.score_checked(_images(8), PROMPTS)
        calls = server.calls
    assert calls == 3  # batch 0, then batch 1 twice
    assert not scores.valid.any()
    (problem,) = scores.problems
    assert problem == (f"reward term 'http' raised HttpRewardError: http reward {server.url}: prompts 4..7 "
                       f"of the 8 in this call: {reason} (failed 2 tries)")


def test_a_refused_request_is_not_retried(monkeypatch):
    monkeypatch.setenv("LOOP_TEST_SCORER_TOKEN", "not-the-right-one")
    with ScoringServer(token=TOKEN) as server:
        reward = build_reward("http", url=server.url, token_env="LOOP_TEST_SCORER_TOKEN", retries=3, backoff=0.0)
        with pytest.raises(HttpRewardError, match=r"prompts 0\.\.1 of the 2 in this call: HTTP 401 .* \(not retried"):
            reward(_images(2), PROMPTS[:2])
    assert server.calls == 1 and server.unauthorized == 1


def test_bearer_token_is_sent_and_never_written(monkeypatch, tmp_path, caplog, capsys):
    monkeypatch.setenv("LOOP_TEST_SCORER_TOKEN", TOKEN)
    images = _images(4)
    with caplog.at_level(logging.DEBUG), ScoringServer(token=TOKEN, plan=["500"]) as server:
        reward = build_reward("http", url=server.url, token_env="LOOP_TEST_SCORER_TOKEN", backoff=0.0)
        scores = reward(images, PROMPTS[:4])
        assert server.unauthorized == 0 and server.calls == 2
    np.testing.assert_array_equal(scores, mean_pixel(images).astype(np.float32))
    cfg = load_config("configs/debug.yaml", {
        "reward.terms.0.name": "http", "reward.terms.0.kwargs": {"url": server.url, "token_env": "LOOP_TEST_SCORER_TOKEN"}
    })
    dump_config(cfg, tmp_path / "config.yaml")
    out = capsys.readouterr()
    for text in ((tmp_path / "config.yaml").read_text(), caplog.text, out.out, out.err, repr(reward)):
        assert TOKEN not in text
    assert "LOOP_TEST_SCORER_TOKEN" in (tmp_path / "config.yaml").read_text()  # the variable's name only
    assert token_env_values(cfg.reward.terms) == {"LOOP_TEST_SCORER_TOKEN": TOKEN}  # what the driver forwards


def test_missing_token_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("LOOP_TEST_SCORER_TOKEN", raising=False)
    with pytest.raises(HttpRewardError, match="kwargs.token_env names 'LOOP_TEST_SCORER_TOKEN', which is not set"):
        build_reward("http", url="http://127.0.0.1:9/score", token_env="LOOP_TEST_SCORER_TOKEN")
    with ScoringServer(token=TOKEN) as server:  # a server that wants one, asked without: 401, named
        reward = build_reward("http", url=server.url)
        with pytest.raises(HttpRewardError, match=re.escape(f"http reward {server.url}: prompts 0..0") + ".*HTTP 401"):
            reward(_images(1), PROMPTS[:1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "reward.terms.0.kwargs.url: Field required"),
        ({"url": "ftp://host/score"}, "reward.terms.0.kwargs.url: 'ftp://host/score' is not an http:// or https:// URL"),
        ({"url": "http://h/s", "timeout": 0}, "reward.terms.0.kwargs.timeout: Input should be greater than 0"),
        ({"url": "http://h/s", "tiemout": 3}, "reward.terms.0.kwargs.tiemout: unknown key"),
        ({"url": "http://h/s", "encoding": "jpeg"}, "reward.terms.0.kwargs.encoding: Input should be 'png' or 'raw'"),
        ({"url": "http://h/s", "token_env": "Bearer abc"}, "reward.terms.0.kwargs.token_env: 'Bearer abc' is not an"),
    ],
)
def test_bad_http_kwargs_are_refused_before_any_actor_starts(kwargs, message):
    from loop_ray.system.run.validate import validate_inputs

    cfg = load_config("configs/debug.yaml", {"reward.terms.0.name": "http", "reward.terms.0.kwargs": kwargs})
    with pytest.raises(ConfigError) as err:
        validate_inputs(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_backoff_doubles_up_to_the_cap():
    assert backoff_delays(5, 1.0, 6.0) == [1.0, 2.0, 4.0, 6.0, 6.0]
    assert backoff_delays(0, 1.0, 6.0) == []


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"scores": [1, 2.5]}', None),
        (b"[1, 2]", "not an object"),
        (b'{"score": [1, 2]}', "not an object"),
        (b'{"scores": [1, true]}', "score 1 is true"),
        (b'{"scores": ["1", 2]}', 'score 0 is "1", not a finite number'),
        (b'{"scores": [1, Infinity]}', "score 1 is Infinity"),
        (b'{"scores": [1e400, 1]}', "score 0 is Infinity"),
        (b'{"scores": [1e39, 1]}', "beyond float32"),
        (b'{"scores": [' + b"1" * 400 + b', 1]}', "score 0 is 1111"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_parse_scores(body, message):
    if message is None:
        np.testing.assert_array_equal(parse_scores(body, 2), np.array([1.0, 2.5], np.float32))
    else:
        with pytest.raises(BadAnswer, match=re.escape(message)):
            parse_scores(body, 2)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_scorer_answers_the_http_reward_png_raw_and_token(monkeypatch):
    """examples/http_scorer.py, imported, serves what the http reward sends (PNG and raw, with a token)."""
    server = _load_example("http_scorer").make_server("127.0.0.1", 0, TOKEN)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/score"
        monkeypatch.setenv("LOOP_TEST_SCORER_TOKEN", TOKEN)
        images = _images(5)
        for encoding in ("png", "raw"):
            reward = build_reward("http", url=url, encoding=encoding, token_env="LOOP_TEST_SCORER_TOKEN", retries=0)
            np.testing.assert_allclose(reward(images, PROMPTS[:5]), mean_pixel(images), rtol=1e-6)
        monkeypatch.delenv("LOOP_TEST_SCORER_TOKEN")
        with pytest.raises(HttpRewardError, match="HTTP 401"):
            build_reward("http", url=url, retries=0)(images, PROMPTS[:5])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


def test_example_scorer_runs_as_a_script():
    """`PORT=0 python examples/http_scorer.py` prints its URL and answers an unauthenticated request."""
    env = {**os.environ, "PORT": "0"}
    env.pop("SCORER_TOKEN", None)
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "http_scorer.py")], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        url = re.search(r"http://\S+", proc.stdout.readline()).group(0)
        assert url.startswith("http://127.0.0.1:")
        images = _images(3)
        np.testing.assert_allclose(build_reward("http", url=url, retries=0)(images, PROMPTS[:3]), mean_pixel(images),
                                   rtol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_example_custom_reward_builds_by_import_path(monkeypatch):
    """examples/custom_reward.py as a config names it: `custom_reward:RedShare` with kwargs."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    reward = build_reward("custom_reward:RedShare", min_red=200)
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0, :2] = (250, 10, 10)  # half the first image is red enough
    images[1] = (180, 10, 10)  # red, but below min_red
    np.testing.assert_array_equal(reward(images, ["a", "b"]), np.array([0.5, 0.0], np.float32))
    with pytest.raises(ValueError, match="min_red"):
        build_reward("custom_reward:RedShare", min_red=300)
