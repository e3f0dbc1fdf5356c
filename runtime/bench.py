"""Speed runs (`kiln bench`): prefill/decode tok/s, bytes a decode step reads,
achieved and copy bandwidth. Built on Session's public step API."""

from __future__ import annotations

import time

import numpy as np

from ..tvm_compat import runtime
from .dtypes import itemsize
from .sampler import SamplingParams


def weight_bytes_per_token(manifest: dict) -> int:
    """Bytes of weights one decode step reads: every param once, except the
    embedding table, of which one row is read — unless it is tied to the LM head —
    and stacked experts (mixture of experts), of which the token's k of E are read."""
    cfg = manifest["model"]["config"]
    n_exp, k = cfg.get("num_experts") or 0, cfg.get("num_experts_per_tok") or 0
    total = 0
    for p in manifest["params"]:
        n = int(np.prod(p["shape"])) * itemsize(p["dtype"])
        if p["name"] == "embed_tokens" and not cfg.get("tie_word_embeddings"):
            n = int(p["shape"][1]) * itemsize(p["dtype"])
        elif n_exp and ".experts." in p["name"] and p["shape"][0] == n_exp:
            n = n * k // n_exp
        total += n
    return total


def copy_bandwidth(session, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written
    (the convention of the peers' table). Host memory copy on CPU."""
    rt, dev = runtime(), session.tvm_device
    n = nbytes // 4
    a = rt.runtime.empty((n,), "float32", dev)
    b = rt.runtime.empty((n,), "float32", dev)
    a.copyto(b)
    session.sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a.copyto(b)
    session.sync()
    secs = (time.perf_counter() - t0) / reps
    return 2 * nbytes / secs / 1e9


def decode_at_context(session, context: int, gen_len: int, token: int = 13) -> float:
    """Greedy decode tok/s of a sequence after `context` tokens already in the
    KV cache. The cache is advanced without running the model
    (Session.advance): the attention kernels still read every cached byte,
    which is what a speed run at a long context measures, and it skips a
    prefill that would cost more than the decode being timed."""
    seq = session.add_sequence()
    try:
        session.advance(seq, context)
        session.decode_greedy([seq], [token])  # first step at this length: lazy setup out of the timing
        session.sync()
        t0 = time.perf_counter()
        for _ in range(gen_len):
            session.decode_greedy([seq], [token])
        session.sync()
        return gen_len / (time.perf_counter() - t0)
    finally:
        session.remove_sequence(seq)


def speed_run(session, prompt_len: int, gen_len: int, context: int = 0) -> dict:
    """What `kiln bench` prints: a warm-up, then one greedy generation of gen_len
    tokens after a prompt_len-token prompt (EOS ignored), timed; bytes per token
    (weights + the KV cache read at the average position), achieved GB/s and its
    share of copy bandwidth. context > 0: the same for decode after `context`
    cached tokens (decode_at_context). The session needs room for
    max(prompt_len, context) + gen_len + 1 tokens."""
    s = session
    ids = [(i * 7919 + 13) % s.vocab_size for i in range(prompt_len)]
    s.generate(ids[: min(8, len(ids))], max_new_tokens=4, ignore_eos=True)  # warm-up
    res = s.generate(ids, max_new_tokens=gen_len, sampling=SamplingParams(temperature=0), ignore_eos=True)
    m = s.artifact.manifest
    per_token = weight_bytes_per_token(m)
    kv = m["kv_cache"]["bytes_per_token"] * (prompt_len + gen_len / 2)
    gbs = (per_token + kv) * res.decode_tok_per_s / 1e9
    copy = copy_bandwidth(s)
    out = {
        "device": s.device, "target": s.target.get("cpu") or s.target.get("mcpu") or ",".join(s.target.get("archs") or []),
        "prompt_len": prompt_len, "gen_len": gen_len,
        "load_seconds": round(s.load_seconds, 3),
        "time_to_first_token_ms": round(res.prefill_seconds * 1e3, 2),
        "prefill_tok_per_s": round(res.prefill_tok_per_s, 1),
        "decode_tok_per_s": round(res.decode_tok_per_s, 2),
        "weight_bytes_per_token": per_token, "kv_bytes_per_token_avg": int(kv),
        "achieved_GB_per_s": round(gbs, 1),
        "copy_GB_per_s": round(copy, 1),
        "share_of_copy_bandwidth": round(gbs / copy, 3) if copy else None,
    }
    if context:
        rate = decode_at_context(s, context, gen_len)
        kv_c = m["kv_cache"]["bytes_per_token"] * (context + gen_len / 2)
        gbs_c = (per_token + kv_c) * rate / 1e9
        out.update({"context": context, "context_decode_tok_per_s": round(rate, 2),
                    "context_kv_bytes_per_token_avg": int(kv_c), "context_achieved_GB_per_s": round(gbs_c, 1),
                    "context_share_of_copy_bandwidth": round(gbs_c / copy, 3) if copy else None})
    return out

