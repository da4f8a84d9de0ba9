"""Content hashes of files, read in 1 MiB blocks (checkpoints and datasets can be gigabytes)."""
from __future__ import annotations

import hashlib
import os


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of the file's bytes: "sha256" keys the cache and checks the default weights, "md5" checks the
    official CIFAR files."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
