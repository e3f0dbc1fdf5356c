"""Paged attention kernels for CPUs, called by TVM's paged KV cache runtime.

TVM 0.27's CPU kernels walk one key at a time per head, serially, with the
RoPE branch evaluated per element: SmolLM2's 128-token prefill spent ~1 s in
attention. These keep the runtime's calling convention (same arguments, so
the C++ PagedAttentionKVCache calls them unchanged) and:
  - run (sequence, head) or (query, head) pairs in parallel;
  - take keys a page (block of `block` rows) at a time: scores for the block,
    one online-softmax rescale per block instead of per key;
  - vectorise dot products (`lanes` partial sums) and the V accumulation.
RoPE is applied before the cache (RopeMode.NORMAL), so `rotary_mode` is 0 and
unused here. Scores are in base 2 (scaled by log2 e); lse is base 2, as the
runtime's merge kernel expects.

Buffers (the runtime's layout):
  pages   # [max_pages, 2 (k, v), kv_heads, page_size, head_dim]
  q       # [tokens, q_heads, head_dim];  output like q;  lse  # [tokens, q_heads] fp32
"""

from __future__ import annotations

import math

from ...tvm_compat import compiler

_t = compiler()
T = _t.T

NEG = -5e4  # the runtime's "no score yet" value (merge kernels assume it)
LOG2E = math.log2(math.e)


def _lanes(head_dim: int, lanes: int) -> int:
    while head_dim % lanes:
        lanes //= 2
    return max(lanes, 1)


def _row_macros(D: int, dtype: str):
    """What both kernels do per (query row, head): start the online softmax
    (scaled query in registers, empty output, running max/sum), and finish it
    (normalise, write the row's output and its base-2 lse)."""

    @T.macro
    def start_row(q, row, h, sm_scale, qv, ov, st):
        for i in T.vectorized(D):
            qv[i] = T.Cast("float32", q[row, h, i]) * sm_scale * T.float32(LOG2E)
            ov[i] = T.float32(0)
        st[0] = T.float32(NEG)
        st[1] = T.float32(0)

    @T.macro
    def finish_row(output, lse, row, h, ov, st):
        if st[1] > T.float32(0):
            for i in T.vectorized(D):
                output[row, h, i] = T.Cast(dtype, ov[i] / st[1])
            lse[row, h] = st[0] + T.log2(st[1])
        else:
            for i in T.vectorized(D):
                output[row, h, i] = T.Cast(dtype, T.float32(0))
            lse[row, h] = T.float32(NEG)

    return start_row, finish_row


def paged_decode_attention_cpu(kv_heads: int, q_heads: int, head_dim: int, dtype: str, lanes: int = 8, page_size: int = 16):
    """One new token per sequence attends to all its cached keys."""
    H, D, G = q_heads, head_dim, q_heads // kv_heads
    L = _lanes(head_dim, lanes)
    P = page_size
    start_row, finish_row = _row_macros(D, dtype)

    @T.prim_func
    def paged_decode_attention(
        var_q: T.handle,
        var_pages: T.handle,
        var_page_indptr: T.handle,
        var_page_values: T.handle,
        var_length_info: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "paged_decode_attention_cpu"})
        B = T.int32()
        nnz_pages = T.int32()
        max_pages = T.int32()
        o1 = T.int32()
        o2 = T.int32()
        o3 = T.int32()
        o4 = T.int32()
        o5 = T.int32()
        q = T.match_buffer(var_q, (B, H, D), dtype)
        pages = T.match_buffer(var_pages, (max_pages, 2, kv_heads, P, D), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (B + 1,), "int32", elem_offset=o1)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=o2)
        last_page_len = T.match_buffer(var_length_info, (B,), "int32", elem_offset=o3)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (B,), "int32", elem_offset=o4)
        q_rope_position = T.match_buffer(var_q_rope_position, (B,), "int32", elem_offset=o5)
        output = T.match_buffer(var_output, (B, H, D), dtype)
        lse = T.match_buffer(var_lse, (B, H), "float32")
        for bh in T.parallel(B * H):
            qv = T.alloc_buffer((D,), "float32", scope="local")
            ov = T.alloc_buffer((D,), "float32", scope="local")
            sv = T.alloc_buffer((P,), "float32", scope="local")
            acc = T.alloc_buffer((L,), "float32", scope="local")
            st = T.alloc_buffer((3,), "float32", scope="local")  # running max, running sum, block max
            b: T.int32 = bh // H
            h: T.int32 = bh % H
            hk: T.int32 = h // G
            begin: T.int32 = page_indptr[b]
            npages: T.int32 = page_indptr[b + 1] - begin
            start_row(q, b, h, sm_scale, qv, ov, st)
            for p in T.serial(npages):
                page: T.int32 = page_values[begin + p]
                rows: T.int32 = T.if_then_else(p == npages - 1, last_page_len[b], P)
                st[2] = st[0]
                for r in T.serial(rows):
                    for l in T.vectorized(L):
                        acc[l] = T.float32(0)
                    for c in T.serial(D // L):
                        for l in T.vectorized(L):
                            acc[l] = acc[l] + qv[c * L + l] * T.Cast("float32", pages[page, 0, hk, r, c * L + l])
                    sv[r] = T.float32(0)
                    for l in T.serial(L):
                        sv[r] = sv[r] + acc[l]
                    st[2] = T.max(st[2], sv[r])
                scale: T.float32 = T.exp2(st[0] - st[2])
                st[1] = st[1] * scale
                for i in T.vectorized(D):
                    ov[i] = ov[i] * scale
                for r in T.serial(rows):
                    w: T.float32 = T.exp2(sv[r] - st[2])
                    st[1] = st[1] + w
                    for i in T.vectorized(D):
                        ov[i] = ov[i] + w * T.Cast("float32", pages[page, 1, hk, r, i])
                st[0] = st[2]
            finish_row(output, lse, b, h, ov, st)

    return paged_decode_attention


def ragged_prefill_attention_cpu(kv_heads: int, q_heads: int, head_dim: int, dtype: str, lanes: int = 8, block: int = 16):
    """Queries of this forward pass attend to keys of this forward pass (causal)."""
    H, D, G = q_heads, head_dim, q_heads // kv_heads
    L = _lanes(head_dim, lanes)
    R = block
    start_row, finish_row = _row_macros(D, dtype)

    @T.prim_func
    def ragged_prefill_attention(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        var_kv_indptr: T.handle,
        var_q_rope_position: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "ragged_prefill_attention_cpu"})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        o1 = T.int32()
        o2 = T.int32()
        o3 = T.int32()
        o4 = T.int32()
        q = T.match_buffer(var_q, (qo_len, H, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=o1)
        k = T.match_buffer(var_k, (kv_len, kv_heads, D), dtype)
        v = T.match_buffer(var_v, (kv_len, kv_heads, D), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=o2)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=o3)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=o4)
        output = T.match_buffer(var_output, (qo_len, H, D), dtype)
        lse = T.match_buffer(var_lse, (qo_len, H), "float32")
        for b in T.serial(batch_size):
            q0: T.int32 = q_indptr[b]
            nq: T.int32 = q_indptr[b + 1] - q0
            k0: T.int32 = kv_indptr[b]
            nk: T.int32 = kv_indptr[b + 1] - k0
            for qh in T.parallel(nq * H):
                qv = T.alloc_buffer((D,), "float32", scope="local")
                ov = T.alloc_buffer((D,), "float32", scope="local")
                sv = T.alloc_buffer((R,), "float32", scope="local")
                acc = T.alloc_buffer((L,), "float32", scope="local")
                st = T.alloc_buffer((3,), "float32", scope="local")
                qi: T.int32 = qh // H
                h: T.int32 = qh % H
                hk: T.int32 = h // G
                visible: T.int32 = T.if_then_else(causal > 0, T.min(nk - nq + qi + 1, nk), nk)
                start_row(q, q0 + qi, h, sm_scale, qv, ov, st)
                for blk in T.serial((visible + R - 1) // R):
                    rows: T.int32 = T.min(R, visible - blk * R)
                    st[2] = st[0]
                    for r in T.serial(rows):
                        for l in T.vectorized(L):
                            acc[l] = T.float32(0)
                        for c in T.serial(D // L):
                            for l in T.vectorized(L):
                                acc[l] = acc[l] + qv[c * L + l] * T.Cast("float32", k[k0 + blk * R + r, hk, c * L + l])
                        sv[r] = T.float32(0)
                        for l in T.serial(L):
                            sv[r] = sv[r] + acc[l]
                        st[2] = T.max(st[2], sv[r])
                    scale: T.float32 = T.exp2(st[0] - st[2])
                    st[1] = st[1] * scale
                    for i in T.vectorized(D):
                        ov[i] = ov[i] * scale
                    for r in T.serial(rows):
                        w: T.float32 = T.exp2(sv[r] - st[2])
                        st[1] = st[1] + w
                        for i in T.vectorized(D):
                            ov[i] = ov[i] + w * T.Cast("float32", v[k0 + blk * R + r, hk, i])
                    st[0] = st[2]
                finish_row(output, lse, q0 + qi, h, ov, st)

    return ragged_prefill_attention
