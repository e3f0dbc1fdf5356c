"""Quantized paged KV cache kernels for CUDA: TIR launches of the device
functions in cuda/kv_quant.cuh (append; split-KV attention whose splits are
merged by attention_decode.cuh's split_merge). Same contract as the CPU
kernels (kv_quant_cpu.py): the whole cache plus a layer index.

Prefill and decode use the same attention kernel: every query row is its own
"sequence" of keys 0..meta[0] + row, split along the keys only while the
launch has fewer than TARGET_BLOCKS blocks (a 2048-row prefill never splits).
"""

from __future__ import annotations

from ..quant import KVFormat
from ...tvm_compat import compiler
from .attention_cuda import C_TYPES, MAX_SPLITS, MERGE_GROUPS, MIN_KEYS_PER_SPLIT, NUM_WARPS, TARGET_BLOCKS, merge_grid

_t = compiler()
T = _t.T

# one wave on an H100: 132 SMs x 4 resident blocks (128 registers x 128 threads); measured
# 8B at 32k: 126-130 tok/s, against 121-122 with a 4-deep pipeline at 167 registers and 396 blocks
QTARGET_BLOCKS = TARGET_BLOCKS


def _check(head_dim: int, dtype: str) -> None:
    if head_dim not in (32, 64, 128, 256) or dtype not in C_TYPES:
        raise ValueError(f"quantized KV cache on CUDA: head_dim {head_dim} / dtype {dtype} not supported (32/64/128/256; {', '.join(C_TYPES)})")


def kv_append_cuda(kv_heads: int, head_dim: int, page_size: int, fmt: KVFormat, dtype: str):
    _check(head_dim, dtype)
    Hk, D, P, cd = kv_heads, head_dim, page_size, fmt.code_dtype
    fn = f"kiln::kv_quant_append<{C_TYPES[dtype]}, {D}, {fmt.cuda_code}>"
    warps = 4

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
        for bx in T.thread_binding(T.ceildiv(s * Hk * 2, warps), thread="blockIdx.x"):
            for tx in T.thread_binding(warps * 32, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", fn, T.address_of(k[0, 0, 0, 0]), T.address_of(v[0, 0, 0, 0]), T.address_of(meta[0]),
                                         T.address_of(pages[0, 0, 0, 0, 0, 0]), T.address_of(scales[0, 0, 0, 0, 0]),
                                         T.Cast("int32", s), Hk, P, npg, layer))

    return kv_append


def kv_attention_cuda(kv_heads: int, q_heads: int, head_dim: int, page_size: int, fmt: KVFormat, dtype: str, sm_scale: float):
    _check(head_dim, dtype)
    Hk, H, D, P, cd = kv_heads, q_heads, head_dim, page_size, fmt.code_dtype
    vec = 16 if D >= 256 else 8
    group = H // Hk
    cap = max(1, 64 // vec)  # q and the accumulators stay in registers: G * VEC <= 64
    G = max(g for g in range(1, min(group, cap) + 1) if group % g == 0)
    chunks = group // G
    ct = C_TYPES[dtype]
    partial = f"kiln::kv_quant_attention_partial<{ct}, {D}, {G}, {NUM_WARPS}, {fmt.cuda_code}>"
    merge = f"kiln::split_merge<{ct}, {D}, {D}, {MERGE_GROUPS}>"

    def num_splits(s, m):
        by_keys = T.ceildiv((m - 1) * P, MIN_KEYS_PER_SPLIT)
        by_gpu = T.ceildiv(QTARGET_BLOCKS, s * Hk * chunks)
        return T.Cast("int32", T.max(T.min(T.min(by_keys, by_gpu), MAX_SPLITS), 1))

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
        ws = T.alloc_buffer((s * H * T.Cast("int64", num_splits(s, m)) * (D + 2),), "float32")
        lse = T.alloc_buffer((s * H,), "float32")
        for bx in T.thread_binding(s * Hk * chunks * T.Cast("int64", num_splits(s, m)), thread="blockIdx.x"):
            for tx in T.thread_binding(NUM_WARPS * 32, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", partial, T.address_of(q[0, 0, 0, 0]), T.address_of(meta[0]),
                                         T.address_of(pages[0, 0, 0, 0, 0, 0]), T.address_of(scales[0, 0, 0, 0, 0]),
                                         ws.access_ptr("rw"), T.address_of(out[0, 0, 0, 0]), lse.access_ptr("rw"),
                                         Hk, chunks, P, npg, layer, num_splits(s, m), T.float32(sm_scale)))
        for bx in T.thread_binding(merge_grid(s * H, num_splits(s, m)), thread="blockIdx.x"):
            for tx in T.thread_binding(D * MERGE_GROUPS, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", merge, ws.access_ptr("rw"), T.address_of(out[0, 0, 0, 0]), lse.access_ptr("rw"),
                                         num_splits(s, m)))

    return kv_attention
