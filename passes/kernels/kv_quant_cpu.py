"""Quantized paged KV cache kernels for CPUs: append (quantize) and attention.

Formats and layouts: passes/quant/kv.py. Both kernels take the whole cache
and a layer index (a scalar argument), so one function serves every layer:

    k, v    # [1, tokens, kv_heads, head_dim]   after RoPE (compute dtype)
    meta    # [1 + pages] int32: position of the first token of this call, then the page table
    pages   # [layers, num_pages, 2, kv_heads, page_size, head_dim]  codes
    scales  # [layers, num_pages, 2, kv_heads, page_size]            float32
    q, out  # [1, tokens, q_heads, head_dim]

Token i of a call sits at position meta[0] + i, in page meta[1 + pos // P],
slot pos % P; it attends to positions 0..meta[0] + i (causal), all read from
the pages: prefill and decode see the same quantized keys and values.

decode_batch's rows variants (one token of each of n sequences, k / v / q / out
[n, 1, heads, head_dim]) take a ragged meta (runtime/kv_cache.py builds it):

    meta    # [2 + 2 n + pages] int32: n, pos[n], start[n + 1], then the page tables one after another

token b sits at position pos[b], in page meta[2 + 2 n + start[b] + pos[b] // P]; each
row runs the single-sequence kernel's loop body (a sequence's logits do not
depend on the batch).
Attention follows attention_cpu.py (parallel over (token, head), keys a page
at a time, one online-softmax rescale per page, vectorised dots); a row's
scale multiplies its dot product and its softmax weight, never the codes.
"""

from __future__ import annotations

import math

from ..quant import KVFormat
from ...tvm_compat import compiler
from .attention_cpu import _lanes

_t = compiler()
T = _t.T

LOG2E = math.log2(math.e)
NEG = -1e30


def kv_append_cpu(kv_heads: int, head_dim: int, page_size: int, fmt: KVFormat, dtype: str, rows: bool = False):
    """Quantize this call's K and V rows into their page slots (in place). rows: decode_batch's
    [n, 1, kv_heads, head_dim] with the ragged meta."""
    Hk, D, P, cd = kv_heads, head_dim, page_size, fmt.code_dtype
    scaled = fmt.scaled
    qmax = T.float32(fmt.qmax if fmt.scaled else 1.0)

    @T.macro
    def store(k, v, pages, scales, layer, tb, ts, h, kv, page, slot):
        row = T.alloc_buffer((D,), "float32", scope="local")
        st = T.alloc_buffer((1,), "float32", scope="local")
        for d in T.serial(D):
            row[d] = T.if_then_else(kv == 0, T.Cast("float32", k[tb, ts, h, d]), T.Cast("float32", v[tb, ts, h, d]))
        st[0] = T.float32(1)  # unscaled formats: the value itself, scale 1
        if scaled:
            st[0] = T.float32(0)
            for d in T.serial(D):
                st[0] = T.max(st[0], T.fabs(row[d]))
        inv: T.float32 = T.if_then_else(st[0] > T.float32(0), qmax / st[0], T.float32(0))
        scales[layer, page, kv, h, slot] = st[0] / qmax
        for d in T.vectorized(D):
            pages[layer, page, kv, h, slot, d] = fmt.tir_encode(row[d] * inv)

    if rows:
        @T.prim_func
        def kv_append_rows(var_k: T.handle, var_v: T.handle, var_meta: T.handle, var_pages: T.handle, var_scales: T.handle, layer: T.int64):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # opaque: never fused
            n = T.int64()
            m = T.int64()
            nl = T.int64()
            npg = T.int64()
            k = T.match_buffer(var_k, (n, 1, Hk, D), dtype)
            v = T.match_buffer(var_v, (n, 1, Hk, D), dtype)
            meta = T.match_buffer(var_meta, (m,), "int32")
            pages = T.match_buffer(var_pages, (nl, npg, 2, Hk, P, D), cd)
            scales = T.match_buffer(var_scales, (nl, npg, 2, Hk, P), "float32")
            for job in T.parallel(n * (Hk * 2)):
                b: T.int64 = job // (Hk * 2)
                pos: T.int64 = T.Cast("int64", meta[1 + b])
                page: T.int64 = T.Cast("int64", meta[2 + 2 * n + T.Cast("int64", meta[1 + n + b]) + pos // P])
                store(k, v, pages, scales, layer, b, 0, job // 2 % Hk, job % 2, page, pos % P)

        return kv_append_rows

    @T.prim_func
    def kv_append(var_k: T.handle, var_v: T.handle, var_meta: T.handle, var_pages: T.handle, var_scales: T.handle, layer: T.int64):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # opaque: never fused
        s = T.int64()
        m = T.int64()
        nl = T.int64()
        npg = T.int64()
        k = T.match_buffer(var_k, (1, s, Hk, D), dtype)
        v = T.match_buffer(var_v, (1, s, Hk, D), dtype)
        meta = T.match_buffer(var_meta, (m,), "int32")
        pages = T.match_buffer(var_pages, (nl, npg, 2, Hk, P, D), cd)
        scales = T.match_buffer(var_scales, (nl, npg, 2, Hk, P), "float32")
        for job in T.parallel(s * (Hk * 2)):
            t: T.int64 = job // (Hk * 2)
            pos: T.int64 = T.Cast("int64", meta[0]) + t
            store(k, v, pages, scales, layer, 0, t, job // 2 % Hk, job % 2, T.Cast("int64", meta[1 + pos // P]), pos % P)

    return kv_append


def kv_attention_cpu(kv_heads: int, q_heads: int, head_dim: int, page_size: int, fmt: KVFormat, dtype: str, sm_scale: float,
                     lanes: int = 8, rows: bool = False):
    """Each query row attends (causally) to every cached row up to its position. rows: decode_batch's
    [n, 1, q_heads, head_dim] with the ragged meta."""
    Hk, H, D, P, cd = kv_heads, q_heads, head_dim, page_size, fmt.code_dtype
    G = H // Hk
    L = _lanes(D, lanes)
    qscale = T.float32(sm_scale * LOG2E)

    @T.macro
    def attend(q, meta, pages, scales, layer, out, qb, qs, h, visible, pbase):
        """Query row q[qb, qs, h] over positions 0 .. visible - 1, pages meta[pbase + p]."""
        qv = T.alloc_buffer((D,), "float32", scope="local")
        ov = T.alloc_buffer((D,), "float32", scope="local")
        sv = T.alloc_buffer((P,), "float32", scope="local")
        acc = T.alloc_buffer((L,), "float32", scope="local")
        st = T.alloc_buffer((3,), "float32", scope="local")  # running max, running sum, page max
        hk: T.int64 = h // G
        for d in T.vectorized(D):
            qv[d] = T.Cast("float32", q[qb, qs, h, d]) * qscale
            ov[d] = T.float32(0)
        st[0] = T.float32(NEG)
        st[1] = T.float32(0)
        for p in T.serial((visible + P - 1) // P):
            page: T.int64 = T.Cast("int64", meta[pbase + p])
            rows_here: T.int64 = T.min(T.int64(P), visible - p * P)
            st[2] = st[0]
            for r in T.serial(rows_here):
                for l in T.vectorized(L):
                    acc[l] = T.float32(0)
                for c in T.serial(D // L):
                    for l in T.vectorized(L):
                        acc[l] = acc[l] + qv[c * L + l] * fmt.tir_decode(pages[layer, page, 0, hk, r, c * L + l])
                sv[r] = T.float32(0)
                for l in T.serial(L):
                    sv[r] = sv[r] + acc[l]
                sv[r] = sv[r] * scales[layer, page, 0, hk, r]
                st[2] = T.max(st[2], sv[r])
            rescale: T.float32 = T.exp2(st[0] - st[2])
            st[1] = st[1] * rescale
            for d in T.vectorized(D):
                ov[d] = ov[d] * rescale
            for r in T.serial(rows_here):
                w: T.float32 = T.exp2(sv[r] - st[2])
                st[1] = st[1] + w
                wv: T.float32 = w * scales[layer, page, 1, hk, r]
                for d in T.vectorized(D):
                    ov[d] = ov[d] + wv * fmt.tir_decode(pages[layer, page, 1, hk, r, d])
            st[0] = st[2]
        for d in T.vectorized(D):
            out[qb, qs, h, d] = T.Cast(dtype, ov[d] / st[1])

    if rows:
        @T.prim_func
        def kv_attention_rows(var_q: T.handle, var_meta: T.handle, var_pages: T.handle, var_scales: T.handle, layer: T.int64,
                              var_out: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # opaque: never fused
            n = T.int64()
            m = T.int64()
            nl = T.int64()
            npg = T.int64()
            q = T.match_buffer(var_q, (n, 1, H, D), dtype)
            meta = T.match_buffer(var_meta, (m,), "int32")
            pages = T.match_buffer(var_pages, (nl, npg, 2, Hk, P, D), cd)
            scales = T.match_buffer(var_scales, (nl, npg, 2, Hk, P), "float32")
            out = T.match_buffer(var_out, (n, 1, H, D), dtype)
            for qh in T.parallel(n * H):
                b: T.int64 = qh // H
                attend(q, meta, pages, scales, layer, out, b, 0, qh % H, T.Cast("int64", meta[1 + b]) + 1,
                       2 + 2 * n + T.Cast("int64", meta[1 + n + b]))

        return kv_attention_rows

    @T.prim_func
    def kv_attention(var_q: T.handle, var_meta: T.handle, var_pages: T.handle, var_scales: T.handle, layer: T.int64, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # opaque: never fused
        s = T.int64()
        m = T.int64()
        nl = T.int64()
        npg = T.int64()
        q = T.match_buffer(var_q, (1, s, H, D), dtype)
        meta = T.match_buffer(var_meta, (m,), "int32")
        pages = T.match_buffer(var_pages, (nl, npg, 2, Hk, P, D), cd)
        scales = T.match_buffer(var_scales, (nl, npg, 2, Hk, P), "float32")
        out = T.match_buffer(var_out, (1, s, H, D), dtype)
        for qh in T.parallel(s * H):
            i: T.int64 = qh // H
            attend(q, meta, pages, scales, layer, out, 0, i, qh % H, T.Cast("int64", meta[0]) + i + 1, T.int64(1))

    return kv_attention
