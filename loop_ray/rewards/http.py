"""`http`: a reward served over HTTP by the user (a scorer that cannot share the trainer's
environment, or one a team already runs as a service).

Term kwargs (checked before any actor starts; see `HttpSettings`):

    url          http(s) URL the batches are POSTed to (required)
    timeout      seconds to connect and, separately, to wait for the answer (default 30)
    retries      times a failed batch is sent again (default 3)
    backoff      seconds before the first retry, doubled for each next one, at most max_backoff
                 (defaults 1 and 30)
    batch_size   images per request (default: all images of the reward call, reward.batch_size)
    encoding     "png" (default) or "raw"
    token_env    name of an environment variable holding a bearer token (default: none)

Wire format. Each batch of B images is one `POST url` with `Content-Type: application/json` (and
`Authorization: Bearer TOKEN` when token_env is set) and the body

    {"prompts": [B strings],
     "encoding": "png",
     "shape": [B, H, W, 3],
     "images": [B strings: base64 of an 8-bit RGB PNG file, in the order of the prompts]}

or, with encoding "raw",

    {"prompts": [B strings],
     "encoding": "raw",
     "shape": [B, H, W, 3],
     "images": "one base64 string of the B*H*W*3 uint8 bytes of the array [B, H, W, 3], C order"}

The server answers with a 2xx status and the JSON object {"scores": [B numbers]}, the i-th the
reward of the i-th image. Anything else (a timeout, a refused connection, a non-2xx status, a body
that is not JSON or not such an object, a wrong number of scores, a score that is not a finite
number) fails the batch with a message naming the URL and the batch's prompt indices (within the
reward call), and the batch is sent again after the backoff; a 4xx status other than 408 and 429
says the request itself is wrong (a bad token, a wrong URL) and is not retried. When a batch has
failed every try, the call raises `HttpRewardError`, so the composite marks the call's images
invalid: their groups are rejected (`train/rejected_groups`), and an iteration with every group
rejected stops the run with that message. A batch is scored by the server at most once per
successful answer, and the trainer uses only the answer that succeeded.

The token is read from the environment (in the reward actor; the driver forwards its own value of
that variable to the reward actors it starts, see `token_env_values`) and is never written to the
config, the run folder or a log line; only the variable's name is configured.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loop_ray.rewards import as_uint8_images, register

log = logging.getLogger(__name__)

RETRIED_CLIENT_ERRORS = (408, 429)  # 4xx statuses that may succeed when sent again


class HttpRewardError(RuntimeError):
    """A batch failed every try; the message names the URL and the batch's prompt indices."""


class _Refused(Exception):
    """A 4xx answer that sending the same request again cannot change (bad token, wrong URL)."""


class BadAnswer(ValueError):
    """What the server answered is not {"scores": [one finite number per image]}."""


class HttpSettings(BaseModel):
    """The `http` term's kwargs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    timeout: float = Field(30.0, gt=0)
    retries: int = Field(3, ge=0)
    backoff: float = Field(1.0, ge=0)
    max_backoff: float = Field(30.0, ge=0)
    batch_size: int | None = Field(None, ge=1)
    encoding: Literal["png", "raw"] = "png"
    token_env: str | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return url

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{name!r} is not an environment variable name (the token itself never goes "
                             "in the config)")
        return name


def parse_settings(kwargs: Mapping, prefix: str = "kwargs") -> HttpSettings:
    """The settings, or a one-line ValueError naming each bad kwarg (`PREFIX.timeout: ...`)."""
    try:
        return HttpSettings.model_validate(dict(kwargs))
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join([prefix, *(str(p) for p in e["loc"])])
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg}")
        raise ValueError("; ".join(problems)) from None


def backoff_delays(retries: int, backoff: float, max_backoff: float) -> list[float]:
    """Seconds to wait before each retry: backoff, 2 backoff, 4 backoff, ..., capped at max_backoff."""
    return [min(backoff * 2.0**i, max_backoff) for i in range(retries)]


def encode_request(images: np.ndarray, prompts: Sequence[str], encoding: str) -> dict:
    """The JSON body of one request (see the module docstring) for uint8 images [B, H, W, 3]."""
    images = as_uint8_images(images)
    body = {"prompts": list(prompts), "encoding": encoding, "shape": list(images.shape)}
    if encoding == "raw":
        body["images"] = base64.b64encode(np.ascontiguousarray(images).tobytes()).decode("ascii")
    elif encoding == "png":
        from PIL import Image

        encoded = []
        for image in images:
            buf = io.BytesIO()
            Image.fromarray(image, "RGB").save(buf, format="PNG")
            encoded.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        body["images"] = encoded
    else:
        raise ValueError(f"unknown encoding {encoding!r}; use 'png' or 'raw'")
    return body


def decode_request(body: Mapping) -> tuple[np.ndarray, list[str]]:
    """A request body back as (uint8 images [B, H, W, 3], prompts): what a server in Python does
    with it (used by the tests; examples/http_scorer.py does the same in a standalone file)."""
    shape = tuple(body["shape"])
    if body["encoding"] == "raw":
        images = np.frombuffer(base64.b64decode(body["images"]), np.uint8).reshape(shape)
    else:
        from PIL import Image

        images = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB"))
                           for s in body["images"]]) if body["images"] else np.zeros(shape, np.uint8)
    return images, list(body["prompts"])


def parse_scores(text: bytes | str, n: int) -> np.ndarray:
    """float32 [n] from an answer body {"scores": [n finite numbers]}; BadAnswer saying what
    is wrong otherwise."""
    try:
        answer = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        snippet = text[:80].decode("utf-8", "replace") if isinstance(text, bytes) else text[:80]
        raise BadAnswer(f"the answer is not JSON: {snippet!r}") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("scores"), list):
        raise BadAnswer(f'the answer is not an object {{"scores": [...]}}: {str(answer)[:80]!r}')
    scores = answer["scores"]
    if len(scores) != n:
        raise BadAnswer(f"the answer has {len(scores)} scores for {n} images")
    bad = [i for i, s in enumerate(scores) if not _finite_number(s)]
    if bad:
        raise BadAnswer(f"score {bad[0]} is {json.dumps(scores[bad[0]])[:40]}, not a finite number "
                        f"({len(bad)} of {n} scores)")
    with np.errstate(over="ignore"):
        values = np.asarray(scores, np.float64).astype(np.float32)
    if not np.isfinite(values).all():
        raise BadAnswer("a score is beyond float32's range")
    return values


def _finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float's range
        return False


class HttpReward:
    """reward(images, prompts) -> float32 [B], scored by POSTing batches to the configured URL."""

    def __init__(self, settings: HttpSettings, token: str | None = None):
        import requests

        self.settings = settings
        self._token = token
        self._session = requests.Session()
        self._delays = backoff_delays(settings.retries, settings.backoff, settings.max_backoff)

    def __repr__(self) -> str:  # never the token
        return f"HttpReward({self.settings.url!r})"

    def _scrub(self, text: str) -> str:
        """`text` (a server's answer may echo what it was sent) without the token."""
        return text.replace(self._token, "<token>") if self._token else text

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _post(self, body: bytes, n: int) -> np.ndarray:
        """One request; raises ValueError (worth retrying) or _Refused (not) with the reason."""
        import requests

        s = self.settings
        try:
            resp = self._session.post(s.url, data=body, headers=self._headers(), timeout=(s.timeout, s.timeout))
        except requests.Timeout:
            raise ValueError(f"no answer within the timeout of {s.timeout:g} s") from None
        except requests.RequestException as err:
            raise ValueError(f"the request failed: {type(err).__name__}: {str(err)[:200]}") from None
        if not 200 <= resp.status_code < 300:
            reason = f"HTTP {resp.status_code} {resp.reason}: {resp.text[:120]!r}"
            if 400 <= resp.status_code < 500 and resp.status_code not in RETRIED_CLIENT_ERRORS:
                raise _Refused(reason)
            raise ValueError(reason)
        return parse_scores(resp.content, n)

    def _score_batch(self, images: np.ndarray, prompts: list[str], first: int, total: int) -> np.ndarray:
        s = self.settings
        what = f"http reward {s.url}: prompts {first}..{first + len(prompts) - 1} of the {total} in this call"
        body = json.dumps(encode_request(images, prompts, s.encoding)).encode()
        for attempt in range(len(self._delays) + 1):
            try:
                return self._post(body, len(prompts))
            except _Refused as err:
                raise HttpRewardError(f"{what}: {self._scrub(str(err))} (not retried: the request itself is "
                                      "refused)") from None
            except ValueError as err:
                reason = self._scrub(str(err))
            if attempt == len(self._delays):
                break
            log.warning("%s: %s; sending it again in %.3g s (retry %d of %d)", what, reason,
                        self._delays[attempt], attempt + 1, len(self._delays))
            time.sleep(self._delays[attempt])
        raise HttpRewardError(f"{what}: {reason} (failed {len(self._delays) + 1} tries)")

    def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
        images, prompts = as_uint8_images(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        step = self.settings.batch_size or max(len(prompts), 1)
        out = np.empty(len(prompts), np.float32)
        for a in range(0, len(prompts), step):
            out[a : a + step] = self._score_batch(images[a : a + step], prompts[a : a + step], a, len(prompts))
        return out


def read_token(settings: HttpSettings, environ: Mapping[str, str] = os.environ) -> str | None:
    """The bearer token from the variable named by token_env; a clear error when it is unset."""
    if settings.token_env is None:
        return None
    token = environ.get(settings.token_env)
    if not token:
        raise HttpRewardError(f"http reward {settings.url}: kwargs.token_env names {settings.token_env!r}, which "
                              "is not set (or empty) in the environment of the driver or the reward actor")
    return token


def token_env_values(terms, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """{variable: value} of the token variables the given http reward terms name and this
    process has: what the driver hands the reward actors it starts (never written anywhere)."""
    out = {}
    for term in terms:
        if term.name == "http":
            name = term.kwargs.get("token_env")
            if isinstance(name, str) and environ.get(name):
                out[name] = environ[name]
    return out


@register("http")
def build_http_reward(**kwargs) -> HttpReward:
    settings = parse_settings(kwargs)
    return HttpReward(settings, read_token(settings))


build_http_reward.check_kwargs = parse_settings
