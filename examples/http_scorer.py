"""A complete reward scorer served over HTTP, for loop-ray's `http` reward term.

Run it as it is:  PORT=8000 SCORER_TOKEN=... python examples/http_scorer.py
It scores each image by its mean brightness; replace `score` with your model. It binds 127.0.0.1:
bind 0.0.0.0 (HOST=0.0.0.0) to serve other machines. The wire format is in docs/rewards.md.
"""

from __future__ import annotations

import base64
import io
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def decode(body: dict) -> np.ndarray:
    """The request's images as uint8 [B, H, W, 3] (encoding `png`: B base64 PNG files; `raw`: the
    base64 of the B*H*W*3 bytes in C order, with `shape` giving [B, H, W, 3])."""
    if body["encoding"] == "raw":
        return np.frombuffer(base64.b64decode(body["images"]), np.uint8).reshape(body["shape"])
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB"))
                     for png in body["images"]])


def score(images: np.ndarray, prompts: list[str]) -> list[float]:
    """One score per image: its mean pixel value in [0, 1] (the prompts are not used here)."""
    return (images.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0).tolist()


def make_server(host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> ThreadingHTTPServer:
    """A server answering `POST /score` with {"scores": [...]}; with a token, requests without
    `Authorization: Bearer TOKEN` get 401."""

    class Scorer(BaseHTTPRequestHandler):
        def do_POST(self):
            if token and self.headers.get("Authorization") != f"Bearer {token}":
                self.send_error(401)
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer = json.dumps({"scores": score(decode(body), body["prompts"])}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format, *args):  # one line per request on stderr is noise for a scorer
            pass

    return ThreadingHTTPServer((host, port), Scorer)


if __name__ == "__main__":
    server = make_server(os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000")),
                         os.environ.get("SCORER_TOKEN"))
    print(f"scoring on http://{server.server_address[0]}:{server.server_address[1]}/score", flush=True)
    server.serve_forever()
