"""Paged prefill attention for sliding-window layers on CPU (the cache's
`f_attention_prefill_sliding_window` slot, AttnKind MHA_SLIDING layers).

TVM 0.27's kernel for this slot (`_attention_prefill_cpu(..., sliding_window=True)`)
masks keys but leaves its running maximum unset when a row's first keys are
masked, and writes NaN as soon as a prompt chunk starts past the window. This
one keeps the runtime's calling convention and TVM's mask exactly
(`_causal_or_sliding_cross_mask`: with causal > 0, query row i of a chunk sees
the last W - 1 - i of the kv_len keys the cache hands it; otherwise the causal
or full mask), and computes each row's softmax over its visible keys only, in
two passes (maximum, then weights): a row with none gets output 0 and lse NEG,
which the runtime's merge treats as empty. Keys are addressed through the
sliding page list: position -> (sink or window offset) -> page, slot.

Buffers (the runtime's layout):
  q       # [tokens, q_heads, head_dim];  output like q;  lse  # [tokens, q_heads] fp32, base 2
  pages   # [max_pages, 2 (k, v), kv_heads, page_size, head_dim]
  length_info  # [3, batch]: last page's length, window offset, sink length
"""

from __future__ import annotations

import math

from ...tvm_compat import compiler
from .attention_cpu import NEG

_t = compiler()
T = _t.T
LOG2E = math.log2(math.e)


def paged_prefill_window_attention_cpu(kv_heads: int, q_heads: int, head_dim: int, dtype: str, window: int, page_size: int = 16):
    H, D, G, P, W = q_heads, head_dim, q_heads // kv_heads, page_size, window

    @T.prim_func
    def paged_prefill_window_attention(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_pages: T.handle,
        var_page_indptr: T.handle,
        var_page_values: T.handle,
        var_length_info: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "paged_prefill_window_attention_cpu"})
        B = T.int32()
        total = T.int32()
        nnz_pages = T.int32()
        max_pages = T.int32()
        o1 = T.int32()
        o2 = T.int32()
        o3 = T.int32()
        o4 = T.int32()
        o5 = T.int32()
        o6 = T.int32()
        q = T.match_buffer(var_q, (total, H, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (B + 1,), "int32", elem_offset=o1)
        pages = T.match_buffer(var_pages, (max_pages, 2, kv_heads, P, D), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (B + 1,), "int32", elem_offset=o2)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=o3)
        length_info = T.match_buffer(var_length_info, (3, B), "int32", elem_offset=o4)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (B,), "int32", elem_offset=o5)
        q_rope_position = T.match_buffer(var_q_rope_position, (total,), "int32", elem_offset=o6)
        output = T.match_buffer(var_output, (total, H, D), dtype)
        lse = T.match_buffer(var_lse, (total, H), "float32")
        for bh in T.parallel(B * H):
            qv = T.alloc_buffer((D,), "float32", scope="local")
            ov = T.alloc_buffer((D,), "float32", scope="local")
            st = T.alloc_buffer((2,), "float32", scope="local")  # row maximum, sum of weights
            b: T.int32 = bh // H
            h: T.int32 = bh % H
            hk: T.int32 = h // G
            begin: T.int32 = page_indptr[b]
            npages: T.int32 = page_indptr[b + 1] - begin
            kv_len: T.int32 = T.if_then_else(npages > 0, (npages - 1) * P + length_info[0, b] - length_info[1, b] + length_info[2, b], 0)
            qo_len: T.int32 = q_indptr[b + 1] - q_indptr[b]
            for i in T.serial(qo_len):
                row: T.int32 = q_indptr[b] + i
                # TVM's mask as a key range [lo, kv_len)
                lo: T.int32 = T.if_then_else(causal > 0, T.max(kv_len - T.max(W - i - 1, 0), 0), 0)
                for d in T.serial(D):
                    qv[d] = T.Cast("float32", q[row, h, d]) * sm_scale * T.float32(LOG2E)
                    ov[d] = T.float32(0)
                st[0] = T.float32(NEG)
                st[1] = T.float32(0)
                for col in T.serial(kv_len - lo):
                    pos: T.int32 = lo + col
                    phys: T.int32 = T.if_then_else(pos < length_info[2, b], pos, pos - length_info[2, b] + length_info[1, b])
                    page: T.int32 = page_values[begin + phys // P]
                    s: T.float32 = T.float32(0)
                    for d in T.serial(D):
                        s = s + qv[d] * T.Cast("float32", pages[page, 0, hk, phys % P, d])
                    st[0] = T.max(st[0], s)
                for col in T.serial(kv_len - lo):
                    pos: T.int32 = lo + col
                    phys: T.int32 = T.if_then_else(pos < length_info[2, b], pos, pos - length_info[2, b] + length_info[1, b])
                    page: T.int32 = page_values[begin + phys // P]
                    s: T.float32 = T.float32(0)
                    for d in T.serial(D):
                        s = s + qv[d] * T.Cast("float32", pages[page, 0, hk, phys % P, d])
                    w: T.float32 = T.exp2(s - st[0])
                    st[1] = st[1] + w
                    for d in T.serial(D):
                        ov[d] = ov[d] + w * T.Cast("float32", pages[page, 1, hk, phys % P, d])
                if st[1] > T.float32(0):
                    for d in T.serial(D):
                        output[row, h, d] = T.Cast(dtype, ov[d] / st[1])
                    lse[row, h] = st[0] + T.log2(st[1])
                else:
                    for d in T.serial(D):
                        output[row, h, d] = T.Cast(dtype, T.float32(0))
                    lse[row, h] = T.float32(NEG)

    return paged_prefill_window_attention
