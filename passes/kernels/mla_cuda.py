"""Multi-head latent attention kernels for CUDA: TIR launches of cuda/mla.cuh (append;
split-KV attention in the latent space on CUDA cores, whose splits attention_decode.cuh's split_merge reduces). The contract of mla_cpu.py: the whole latent cache plus a
layer index. v1 holds rows in the activations' dtype (a quantized latent cache on CUDA
and the tensor-core kernel are the next steps: benchmarks/NOTES.md, "MLA on CUDA").

Prefill and decode share the attention kernel: every query row is its own "sequence" of
keys 0..meta[0] + row, split along the keys while the launch has fewer than
TARGET_BLOCKS blocks (as kv_quant_cuda.py does).
"""

from __future__ import annotations

import os

from ...tvm_compat import compiler
from .attention_cuda import C_TYPES, MAX_SPLITS, MERGE_GROUPS, NUM_WARPS, TARGET_BLOCKS, merge_grid

_t = compiler()
T = _t.T

# keys per split at least: a split's partial state is DV + 2 floats per head (DV = 512 for
# DeepSeek), so many short splits make the merge read more than the keys themselves
# (KILN_MLA_MIN_KEYS overrides it for sweeps: benchmarks/NOTES.md, "MLA on CUDA")
MIN_KEYS_PER_SPLIT = int(os.environ.get("KILN_MLA_MIN_KEYS", "32"))


def mla_append_cuda(width: int, page_size: int, dtype: str):
    W, P, ct = width, page_size, C_TYPES[dtype]
    fn = f"kiln::mla_append<{ct}, {W}>"
    warps = 4

    @T.prim_func
    def mla_append(var_kv: T.handle, var_meta: T.handle, var_pages: T.handle, var_scales: T.handle, layer: T.int64):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # opaque: never fused
        s = T.int64()
        m = T.int64()
        nl = T.int64()
        npg = T.int64()
        kv = T.match_buffer(var_kv, (1, s, W), dtype)
        meta = T.match_buffer(var_meta, (m,), "int32")
        pages = T.match_buffer(var_pages, (nl, npg, P, W), dtype)
        scales = T.match_buffer(var_scales, (nl, npg, P), "float32")
        for bx in T.thread_binding(T.ceildiv(s, warps), thread="blockIdx.x"):
            for tx in T.thread_binding(warps * 32, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", fn, T.address_of(kv[0, 0, 0]), T.address_of(meta[0]), T.address_of(pages[0, 0, 0, 0]),
                                         T.address_of(scales[0, 0, 0]), T.Cast("int32", s), P, npg, layer))

    return mla_append


def mla_attention_cuda(q_heads: int, width: int, v_dim: int, page_size: int, dtype: str, sm_scale: float):
    H, W, DV, P, ct = q_heads, width, v_dim, page_size, C_TYPES[dtype]
    if DV > 1024 or DV % 32:
        raise ValueError(f"MLA on CUDA: kv_lora_rank {DV} must be a multiple of 32, at most 1024 (lanes own DV / 32 columns)")
    G = next(g for g in (4, 2, 1) if H % g == 0)  # heads per block: q and O of G heads stay in registers
    chunks = H // G
    partial = f"kiln::mla_attention_partial<{ct}, {W}, {DV}, {G}, {NUM_WARPS}>"
    cols = 64 if DV % 64 == 0 else 32
    merge = f"kiln::split_merge<{ct}, {DV}, {cols}, {MERGE_GROUPS}>"  # column tiles: DV / cols x the blocks

    def num_splits(s, m):
        by_keys = T.ceildiv((m - 1) * P, MIN_KEYS_PER_SPLIT)
        by_gpu = T.ceildiv(TARGET_BLOCKS, s * chunks)
        return T.Cast("int32", T.max(T.min(T.min(by_keys, by_gpu), MAX_SPLITS), 1))

    @T.prim_func
    def mla_attention(var_q: T.handle, var_meta: T.handle, var_pages: T.handle, var_scales: T.handle, layer: T.int64, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # opaque: never fused
        s = T.int64()
        m = T.int64()
        nl = T.int64()
        npg = T.int64()
        q = T.match_buffer(var_q, (1, s, H, W), dtype)
        meta = T.match_buffer(var_meta, (m,), "int32")
        pages = T.match_buffer(var_pages, (nl, npg, P, W), dtype)
        scales = T.match_buffer(var_scales, (nl, npg, P), "float32")
        out = T.match_buffer(var_out, (1, s, H, DV), dtype)
        ws = T.alloc_buffer((s * H * T.Cast("int64", num_splits(s, m)) * (DV + 2),), "float32")
        lse = T.alloc_buffer((s * H,), "float32")
        for bx in T.thread_binding(s * chunks * T.Cast("int64", num_splits(s, m)), thread="blockIdx.x"):
            for tx in T.thread_binding(NUM_WARPS * 32, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", partial, T.address_of(q[0, 0, 0, 0]), T.address_of(meta[0]), T.address_of(pages[0, 0, 0, 0]),
                                         ws.access_ptr("rw"), T.address_of(out[0, 0, 0, 0]), lse.access_ptr("rw"),
                                         H, P, npg, layer, num_splits(s, m), T.float32(sm_scale)))
        for bx in T.thread_binding(merge_grid(s * H * (DV // cols), num_splits(s, m)), thread="blockIdx.x"):
            for tx in T.thread_binding(cols * MERGE_GROUPS, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", merge, ws.access_ptr("rw"), T.address_of(out[0, 0, 0, 0]), lse.access_ptr("rw"),
                                         num_splits(s, m)))

    return mla_attention


def head_matmul_cuda(heads: int, k: int, n: int, transposed: bool, dtype: str, wdtype: str):
    """x  # [1, s, heads, k] times each head's matrix of w  # [heads, k, n] (transposed: [heads, n, k])
    -> [1, s, heads, n] (cuda/mla.cuh head_matmul)."""
    fn = f"kiln::head_matmul<{C_TYPES[dtype]}, {C_TYPES[wdtype]}, {heads}, {k}, {n}, {'true' if transposed else 'false'}>"
    wshape = (heads, n, k) if transposed else (heads, k, n)
    threads = 128 if transposed else 256  # 4 outputs a block (a warp each), or 32 (8 warps slicing k)

    @T.prim_func
    def head_matmul(var_x: T.handle, var_w: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # opaque: never fused
        s = T.int64()
        x = T.match_buffer(var_x, (1, s, heads, k), dtype)
        w = T.match_buffer(var_w, wshape, wdtype)
        y = T.match_buffer(var_y, (1, s, heads, n), dtype)
        for bx in T.thread_binding(T.ceildiv(s * heads * n, 4) if transposed else s * heads * T.ceildiv(n, 32), thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", fn, T.address_of(x[0, 0, 0, 0]), T.address_of(w[0, 0, 0]), T.address_of(y[0, 0, 0, 0]),
                                         T.Cast("int32", s)))

    return head_matmul
