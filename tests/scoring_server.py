"""A real HTTP reward server for the tests: http.server on 127.0.0.1 at a free port, in a thread.

It decodes the `http` reward's wire format (loop_ray.rewards.http) and scores each image by its
mean pixel value / 255. `plan` lists how the first calls misbehave, one mode per call, in order
("ok", "500", "hang", "short", "nan", "notjson"); later calls are "ok". With `token`, a request
without the header `Authorization: Bearer TOKEN` gets 401. It counts every call, and the prompts and
images of the calls it answered with scores, so a test can tell that each image was scored once.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from loop_ray.rewards.http import decode_request


def mean_pixel(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float64).mean(axis=(1, 2, 3)) / 255.0


class ScoringServer:
    def __init__(self, plan=(), token: str | None = None, hang_seconds: float = 30.0):
        self.plan, self.token, self.hang_seconds = list(plan), token, hang_seconds
        self.calls = 0  # every POST
        self.scored_prompts: list[str] = []  # prompts of the calls answered with scores
        self.batches: list[np.ndarray] = []  # the images of those calls, as decoded
        self.encodings: list[str] = []
        self.unauthorized = 0
        self._lock = threading.Lock()
        self._release = threading.Event()  # ends a hanging call
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/score"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _next_mode(self) -> str:
        with self._lock:
            self.calls += 1
            return self.plan.pop(0) if self.plan else "ok"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                mode = server._next_mode()
                if server.token is not None and self.headers.get("Authorization") != f"Bearer {server.token}":
                    with server._lock:
                        server.unauthorized += 1
                    return self._send(401, b'{"error": "missing or wrong bearer token"}')
                if mode == "500":
                    return self._send(500, b'{"error": "model not loaded yet"}')
                if mode == "hang":
                    server._release.wait(server.hang_seconds)
                    return None  # the client gave up long ago
                if mode == "notjson":
                    return self._send(200, b"<html>scores</html>")
                images, prompts = decode_request(body)
                scores = mean_pixel(images).tolist()
                if mode == "short":
                    scores = scores[:-1]
                elif mode == "nan":
                    scores[len(scores) // 2] = float("nan")
                else:
                    with server._lock:
                        server.scored_prompts += prompts
                        server.batches.append(images)
                        server.encodings.append(body["encoding"])
                return self._send(200, json.dumps({"scores": scores}).encode())

        return Handler
