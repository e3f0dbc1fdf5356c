"""Multi-head latent attention (DeepSeek's MLA) over kiln's latent page cache, for CPUs:
append a token's latent row, and attend in the latent space ("absorbed": the
query already carries W_UK, the output still needs W_UV; frontends/models/deepseek.py).

One row per token per layer holds the compressed KV and the rotated shared key:

    latent  # [1, tokens, W]          W = kv_lora_rank + qk_rope_head_dim (c_kv, then k_pe)
    meta    # [1 + pages] int32       position of this call's first token, then the page table
    pages   # [layers, num_pages, page_size, W]  codes of the cache's format
    scales  # [layers, num_pages, page_size]     float32, one per row (1 for float formats)
    q       # [1, tokens, heads, W]   absorbed query: (q_nope @ W_UK, q_pe)
    out     # [1, tokens, heads, Dv]  softmax(q . rows) @ rows[:, :Dv] (Dv = kv_lora_rank)

Keys and values are the same rows: the score reads all W columns, the value
the first Dv. Token i of a call sits at position meta[0] + i (page
meta[1 + pos // P], slot pos % P) and attends causally to positions
0..meta[0] + i, all read from the pages, so prefill and decode see the same
rows. The attention follows kv_quant_cpu.py (parallel over (token, head), keys
a page at a time, one online-softmax rescale per page, vectorised dots); every
head reads the same rows, so at decode they come from cache after the first head.
"""

from __future__ import annotations

from ..quant import KVFormat
from ...tvm_compat import compiler
from .attention_cpu import _lanes
from .kv_quant_cpu import LOG2E, NEG

_t = compiler()
T = _t.T


def mla_append_cpu(width: int, page_size: int, fmt: KVFormat, dtype: str):
    """Write this call's latent rows into their page slots (in place), quantized per row
    for scaled formats."""
    W, P, cd = width, page_size, fmt.code_dtype
    scaled = fmt.scaled
    qmax = T.float32(fmt.qmax if fmt.scaled else 1.0)

    @T.prim_func
    def mla_append(var_kv: T.handle, var_meta: T.handle, var_pages: T.handle, var_scales: T.handle, layer: T.int64):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # opaque: never fused
        s = T.int64()
        m = T.int64()
        nl = T.int64()
        npg = T.int64()
        kv = T.match_buffer(var_kv, (1, s, W), dtype)
        meta = T.match_buffer(var_meta, (m,), "int32")
        pages = T.match_buffer(var_pages, (nl, npg, P, W), cd)
        scales = T.match_buffer(var_scales, (nl, npg, P), "float32")
        for t in T.parallel(s):
            st = T.alloc_buffer((1,), "float32", scope="local")
            pos: T.int64 = T.Cast("int64", meta[0]) + t
            page: T.int64 = T.Cast("int64", meta[1 + pos // P])
            slot: T.int64 = pos % P
            st[0] = T.float32(1)  # unscaled formats: the value itself, scale 1
            if scaled:
                st[0] = T.float32(0)
                for d in T.serial(W):
                    st[0] = T.max(st[0], T.fabs(T.Cast("float32", kv[0, t, d])))
            inv: T.float32 = T.if_then_else(st[0] > T.float32(0), qmax / st[0], T.float32(0))
            scales[layer, page, slot] = st[0] / qmax
            for d in T.serial(W):
                pages[layer, page, slot, d] = fmt.tir_encode(T.Cast("float32", kv[0, t, d]) * inv)

    return mla_append


def mla_attention_cpu(q_heads: int, width: int, v_dim: int, page_size: int, fmt: KVFormat, dtype: str, sm_scale: float, lanes: int = 8):
    """Each query row attends (causally) to every cached latent row up to its position."""
    H, W, Dv, P, cd = q_heads, width, v_dim, page_size, fmt.code_dtype
    L = _lanes(W, lanes)
    qscale = T.float32(sm_scale * LOG2E)

    @T.prim_func
    def mla_attention(var_q: T.handle, var_meta: T.handle, var_pages: T.handle, var_scales: T.handle, layer: T.int64, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # opaque: never fused
        s = T.int64()
        m = T.int64()
        nl = T.int64()
        npg = T.int64()
        q = T.match_buffer(var_q, (1, s, H, W), dtype)
        meta = T.match_buffer(var_meta, (m,), "int32")
        pages = T.match_buffer(var_pages, (nl, npg, P, W), cd)
        scales = T.match_buffer(var_scales, (nl, npg, P), "float32")
        out = T.match_buffer(var_out, (1, s, H, Dv), dtype)
        for qh in T.parallel(s * H):
            qv = T.alloc_buffer((W,), "float32", scope="local")
            ov = T.alloc_buffer((Dv,), "float32", scope="local")
            sv = T.alloc_buffer((P,), "float32", scope="local")
            acc = T.alloc_buffer((L,), "float32", scope="local")
            st = T.alloc_buffer((3,), "float32", scope="local")  # running max, running sum, page max
            i: T.int64 = qh // H
            h: T.int64 = qh % H
            visible: T.int64 = T.Cast("int64", meta[0]) + i + 1
            for d in T.serial(W):
                qv[d] = T.Cast("float32", q[0, i, h, d]) * qscale
            for d in T.vectorized(Dv):
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
                    for c in T.serial(W // L):
                        for l in T.vectorized(L):
                            acc[l] = acc[l] + qv[c * L + l] * fmt.tir_decode(pages[layer, page, r, c * L + l])
                    sv[r] = T.float32(0)
                    for l in T.serial(L):
                        sv[r] = sv[r] + acc[l]
                    sv[r] = sv[r] * scales[layer, page, r]
                    st[2] = T.max(st[2], sv[r])
                rescale: T.float32 = T.exp2(st[0] - st[2])
                st[1] = st[1] * rescale
                for d in T.vectorized(Dv):
                    ov[d] = ov[d] * rescale
                for r in T.serial(rows):
                    w: T.float32 = T.exp2(sv[r] - st[2])
                    st[1] = st[1] + w
                    wv: T.float32 = w * scales[layer, page, r]
                    for d in T.vectorized(Dv):
                        ov[d] = ov[d] + wv * fmt.tir_decode(pages[layer, page, r, d])
                st[0] = st[2]
            for d in T.vectorized(Dv):
                out[0, i, h, d] = T.Cast(dtype, ov[d] / st[1])

    return mla_attention


def head_matmul_cpu(heads: int, k: int, n: int, transposed: bool, dtype: str, wdtype: str, lanes: int = 8):
    """x  # [1, s, heads, k] times each head's matrix of w  # [heads, k, n] (transposed: [heads, n, k])
    -> [1, s, heads, n]: MLA's W_UK (absorbed into the query) and W_UV (after attention).
    Parallel over (head, block of NB outputs); every row of x reads the head's block of w, which
    stays in cache across rows. Not transposed: out[block] += x[k] * w[k, block], vectorised over the
    block (w's rows are contiguous in n); transposed: one vectorised dot over k per output.
    (Relax's batched matmul took 2.7 ms per layer at decode for 4 MB of W_UK: unscheduled.)"""
    H, K, N = heads, k, n
    NB = next(b for b in (64, 32, 16, 8, 4, 2, 1) if N % b == 0)
    blocks = N // NB
    L = _lanes(K, lanes)
    wshape = (H, N, K) if transposed else (H, K, N)

    @T.prim_func
    def head_matmul(var_x: T.handle, var_w: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # opaque: never fused
        s = T.int64()
        x = T.match_buffer(var_x, (1, s, H, K), dtype)
        w = T.match_buffer(var_w, wshape, wdtype)
        y = T.match_buffer(var_y, (1, s, H, N), dtype)
        for job in T.parallel(H * blocks):
            acc = T.alloc_buffer((NB,), "float32", scope="local")
            part = T.alloc_buffer((L,), "float32", scope="local")
            h: T.int64 = job // blocks
            j0: T.int64 = job % blocks * NB
            for t in T.serial(s):
                if transposed:
                    for j in T.serial(NB):
                        for l in T.vectorized(L):
                            part[l] = T.float32(0)
                        for c in T.serial(K // L):
                            for l in T.vectorized(L):
                                part[l] = part[l] + T.Cast("float32", x[0, t, h, c * L + l]) * T.Cast("float32", w[h, j0 + j, c * L + l])
                        acc[j] = T.float32(0)
                        for l in T.serial(L):
                            acc[j] = acc[j] + part[l]
                else:
                    for j in T.vectorized(NB):
                        acc[j] = T.float32(0)
                    for r in T.serial(K):
                        for j in T.vectorized(NB):
                            acc[j] = acc[j] + T.Cast("float32", x[0, t, h, r]) * T.Cast("float32", w[h, r, j0 + j])
                for j in T.vectorized(NB):
                    y[0, t, h, j0 + j] = T.Cast(dtype, acc[j])

    return head_matmul
