"""Sizes and SHA-256 of files, taken from the bytes as they are written.

`write_hashed(path, write)` opens `path` for writing and hands `write` a file object that hashes
everything that goes through it, so a checkpoint's manifest needs no second read of gigabytes of
weights; `hash_file` reads a file back (to verify one, or for a file some library wrote itself).
Both give the same entry: {"bytes": size, "sha256": hex digest}. Nothing else in loop_ray is
imported here, so every layer may use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_BLOCK = 1 << 20


class HashingWriter:
    """A write-only binary stream over an open file that hashes and counts what it writes (enough
    of a file object for torch.save, json and plain writes; it has no fileno, so torch writes
    through it rather than around it)."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = self._f.write(view)
        n = view.nbytes if n is None else n
        self._sha.update(view[:n])
        self.bytes += n
        return n

    def flush(self) -> None:
        self._f.flush()

    def writable(self) -> bool:
        return True

    def entry(self) -> dict:
        return {"bytes": self.bytes, "sha256": self._sha.hexdigest()}


def write_hashed(path: str | Path, write: Callable[[HashingWriter], object]) -> dict:
    """Create `path`, let `write(stream)` fill it, and return the entry of what was written."""
    with open(path, "wb") as f:
        stream = HashingWriter(f)
        write(stream)
    return stream.entry()


def write_bytes_hashed(path: str | Path, data: bytes) -> dict:
    return write_hashed(path, lambda f: f.write(data))


def hash_file(path: str | Path) -> dict:
    """The entry of a file already on disk (reads it)."""
    sha, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            sha.update(block)
            n += len(block)
    return {"bytes": n, "sha256": sha.hexdigest()}
