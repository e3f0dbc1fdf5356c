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


def kv_append_cpu(kv_heads: int, head_dim: int, page_size: int, fmt: KVFormat, dtype: str):
    """Quantize this call's K and V rows into their page slots (in place)."""
    Hk, D, P, cd = kv_heads, head_dim, page_size, fmt.code_dtype
    scaled = fmt.scaled
    qmax = T.float32(fmt.qmax if fmt.scaled else 1.0)

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
            row = T.alloc_buffer((D,), "float32", scope="local")
            st = T.alloc_buffer((1,), "float32", scope="local")
            t: T.int64 = job // (Hk * 2)
            h: T.int64 = job // 2 % Hk
            kv: T.int64 = job % 2
            pos: T.int64 = T.Cast("int64", meta[0]) + t
            page: T.int64 = T.Cast("int64", meta[1 + pos // P])
            slot: T.int64 = pos % P
            for d in T.serial(D):
                row[d] = T.if_then_else(kv == 0, T.Cast("float32", k[0, t, h, d]), T.Cast("float32", v[0, t, h, d]))
            st[0] = T.float32(1)  # unscaled formats: the value itself, scale 1
            if scaled:
                st[0] = T.float32(0)
                for d in T.serial(D):
                    st[0] = T.max(st[0], T.fabs(row[d]))
            inv: T.float32 = T.if_then_else(st[0] > T.float32(0), qmax / st[0], T.float32(0))
            scales[layer, page, kv, h, slot] = st[0] / qmax
            for d in T.vectorized(D):
                pages[layer, page, kv, h, slot, d] = fmt.tir_encode(row[d] * inv)

    return kv_append


def kv_attention_cpu(kv_heads: int, q_heads: int, head_dim: int, page_size: int, fmt: KVFormat, dtype: str, sm_scale: float,
                     lanes: int = 8):
    """Each query row attends (causally) to every cached row up to its position."""
    Hk, H, D, P, cd = kv_heads, q_heads, head_dim, page_size, fmt.code_dtype
    G = H // Hk
    L = _lanes(D, lanes)
    qscale = T.float32(sm_scale * LOG2E)

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
            qv = T.alloc_buffer((D,), "float32", scope="local")
            ov = T.alloc_buffer((D,), "float32", scope="local")
            sv = T.alloc_buffer((P,), "float32", scope="local")
            acc = T.alloc_buffer((L,), "float32", scope="local")
            st = T.alloc_buffer((3,), "float32", scope="local")  # running max, running sum, page max
            i: T.int64 = qh // H
            h: T.int64 = qh % H
            hk: T.int64 = h // G
            visible: T.int64 = T.Cast("int64", meta[0]) + i + 1
            for d in T.vectorized(D):
                qv[d] = T.Cast("float32", q[0, i, h, d]) * qscale
                ov[d] = T.float32(0)
            st[0] = T.float32(NEG)
            st[1] = T.float32(0)
            for p in T.serial((visible + P - 1) // P):
                page: T.int64 = T.Cast("int64", meta[1 + p])
                rows: T.int64 = T.min(T.int64(P), visible - p * P)
                st[2] = st[0]
                for r in T.serial(rows):
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
                for r in T.serial(rows):
                    w: T.float32 = T.exp2(sv[r] - st[2])
                    st[1] = st[1] + w
                    wv: T.float32 = w * scales[layer, page, 1, hk, r]
                    for d in T.vectorized(D):
                        ov[d] = ov[d] + wv * fmt.tir_decode(pages[layer, page, 1, hk, r, d])
                st[0] = st[2]
            for d in T.vectorized(D):
                out[0, i, h, d] = T.Cast(dtype, ov[d] / st[1])

    return kv_attention
