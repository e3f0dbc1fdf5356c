"""The sliding-window paged prefill kernel (passes/kernels/attention_window_cpu.py)
against a float64 numpy twin of TVM's mask: 2 sequences (8 and 3 query rows),
6 / 2 heads, head_dim 24, keys scattered over shuffled pages of 16, a window
offset and an attention sink in one sequence, window 7 (rows whose window holds
no earlier key: output 0, lse NEG), causal and not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kiln.passes.kernels.attention_cpu import NEG
from kiln.passes.kernels.attention_window_cpu import paged_prefill_window_attention_cpu
from kiln.tvm_compat import compiler

TOL = {"float32": dict(rtol=2e-5, atol=2e-5)}
H_Q, H_KV, D, P, W = 6, 2, 24, 16, 7

t = compiler()
tvm = t.tvm


def _twin(q, pages, q_indptr, page_indptr, page_values, info, causal, sm):
    """TVM's _causal_or_sliding_cross_mask semantics, float64: out [n, H, D], base-2 lse [n, H]."""
    out = np.zeros(q.shape)
    lse = np.full(q.shape[:2], NEG)
    for b in range(len(q_indptr) - 1):
        npages = page_indptr[b + 1] - page_indptr[b]
        kv_len = (npages - 1) * P + info[0, b] - info[1, b] + info[2, b] if npages else 0
        for i in range(q_indptr[b + 1] - q_indptr[b]):
            lo = max(kv_len - max(W - i - 1, 0), 0) if causal else 0
            pos = np.arange(lo, kv_len)
            phys = np.where(pos < info[2, b], pos, pos - info[2, b] + info[1, b])
            pg = page_values[page_indptr[b] + phys // P]
            for h in range(H_Q):
                if len(pos) == 0:
                    continue
                k = pages[pg, 0, h // (H_Q // H_KV), phys % P].astype(np.float64)
                v = pages[pg, 1, h // (H_Q // H_KV), phys % P].astype(np.float64)
                s = k @ q[q_indptr[b] + i, h].astype(np.float64) * sm
                p = np.exp(s - s.max())
                out[q_indptr[b] + i, h] = p @ v / p.sum()
                lse[q_indptr[b] + i, h] = (s.max() + math.log(p.sum())) / math.log(2)
    return out, lse


@pytest.mark.parametrize("causal", [1, 0])
def test_window_prefill_matches_twin(causal):
    rng = np.random.default_rng(3)
    q_indptr = np.array([0, 8, 11], np.int32)  # seq 0's rows 6 and 7 see no earlier key (causal)
    page_values = rng.permutation(9).astype(np.int32)  # the two sequences' pages, shuffled in the pool
    page_indptr = np.array([0, 4, 6], np.int32)
    # seq 0: 4 pages, last holds 5, window offset 3 (its first 3 slots are gone), no sink: 50 keys;
    # seq 1: 2 pages, last holds 9, 2 sink slots, offset 4: 23 keys
    info = np.array([[5, 9], [3, 4], [0, 2]], np.int32)
    q = rng.standard_normal((11, H_Q, D)).astype(np.float32)
    pages = rng.standard_normal((9, 2, H_KV, P, D)).astype(np.float32)
    sm = 1 / math.sqrt(D)
    func = paged_prefill_window_attention_cpu(H_KV, H_Q, D, "float32", W, P)
    mod = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target("llvm"))
    dev = tvm.cpu()
    T = lambda a: tvm.runtime.tensor(a, dev)  # noqa: E731
    out = tvm.runtime.empty((11, H_Q, D), "float32", dev)
    lse = tvm.runtime.empty((11, H_Q), "float32", dev)
    zeros = np.zeros(2, np.int32)
    mod["main"](T(q), T(q_indptr), T(pages), T(page_indptr), T(page_values), T(info), T(zeros), T(np.zeros(11, np.int32)),
                out, lse, causal, 0, 1.0, 10000.0, sm)
    want_o, want_lse = _twin(q, pages, q_indptr, page_indptr, page_values, info, causal, sm)
    np.testing.assert_allclose(out.numpy(), want_o, **TOL["float32"])
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=1e-4, atol=1e-4)
    assert np.isfinite(out.numpy()).all()
    if causal:
        assert (want_lse[6:8] == NEG).all() and (out.numpy()[6:8] == 0).all()  # empty windows: nothing, not NaN
