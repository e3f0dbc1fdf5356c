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


def decode_at_context(session, context: int, gen_len: int, token: int = 13) -> float:
    """Decode tok/s for sequence 0 after `context` tokens already in the KV cache.
    The cache is advanced without running the model (its pages hold whatever
    the allocator left there): the attention kernels still read every cached
    byte, which is what a speed run at a long context measures, and it skips
    a prefill that would cost more than the decode being timed."""
    kv = session.kv
    kv.add(0)
    try:
        for s in range(0, context, session.prefill_chunk):
            kv.begin([0], [min(session.prefill_chunk, context - s)])
            kv.end()
        session._greedy_decode(token)  # first step at this length: lazy setup out of the timing
        session.dev.sync()
        t0 = time.perf_counter()
        for _ in range(gen_len):
            session._greedy_decode(token)
        session.dev.sync()
        return gen_len / (time.perf_counter() - t0)
    finally:
        kv.remove(0)
