"""Speed-run helpers for `kiln bench`: bytes a decode step reads, copy bandwidth."""

from __future__ import annotations

import time

import numpy as np

from .dtypes import itemsize


def weight_bytes_per_token(manifest: dict) -> int:
    """Bytes of weights one decode step reads: every param once, except the
    embedding table, of which one row is read — unless it is tied to the LM head."""
    cfg = manifest["model"]["config"]
    total = 0
    for p in manifest["params"]:
        n = int(np.prod(p["shape"])) * itemsize(p["dtype"])
        if p["name"] == "embed_tokens" and not cfg.get("tie_word_embeddings"):
            n = int(p["shape"][1]) * itemsize(p["dtype"])
        total += n
    return total


def copy_bandwidth(session, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written
    (the convention of the peers' table). Host memory copy on CPU."""
    rt, dev = session.rt, session.dev
    n = nbytes // 4
    a = rt.runtime.empty((n,), "float32", dev)
    b = rt.runtime.empty((n,), "float32", dev)
    a.copyto(b)
    dev.sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a.copyto(b)
    dev.sync()
    secs = (time.perf_counter() - t0) / reps
    return 2 * nbytes / secs / 1e9
