"""Split-KV paged decode attention for CUDA (FlashDecoding-style).

TVM 0.27's decode kernel runs one thread block per (sequence, kv head): for
Llama-3-8B at batch 1 that is 8 blocks on a 132-SM H100, and each walks the
whole context in 16-key tiles with a block-wide sync per tile (15.8 us per
layer at a 128-token context, ncu). Here every (sequence, kv head, query-head
chunk) is split along the keys so the launch fills the GPU:

    splits = clamp(min(keys / MIN_KEYS_PER_SPLIT, TARGET_BLOCKS / (B * kv_heads * chunks)), 1, ...)

computed per call on the host from the page count (nnz_pages is a shape the
runtime knows before launch), so a 128-token context and a 32k one each get
their own split count. Stage 1 writes each split's unnormalised output, max
and sum to a workspace; stage 2 merges the splits (one block per query head, kiln::split_merge).
With one split (short contexts, or many sequences) stage 1 writes the final
output and stage 2 returns at once.

The math is CUDA C++ (kernels/cuda/attention_decode.cuh) called through
T.call_extern from two TIR kernels that own the launch configuration, so the
function keeps TVM's decode calling convention and drops into TVM's C++
paged KV cache unchanged. kiln's nvcc callback (compiler/cuda_codegen.py)
puts the header in front of the generated source.
"""

from __future__ import annotations

from pathlib import Path

from ...tvm_compat import compiler

_t = compiler()
T = _t.T

CUDA_SOURCE = Path(__file__).parent / "cuda" / "attention_decode.cuh"
C_TYPES = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"}
NUM_WARPS = 4
MIN_KEYS_PER_SPLIT = 32
TARGET_BLOCKS = 528  # one wave on an H100: 132 SMs x 4 resident blocks (109 registers x 128 threads)
MAX_SPLITS = 512  # kiln::kMaxSplits
MERGE_GROUPS = 4  # thread groups per column in the split merge (kiln::split_merge), each summing a quarter of the splits


def merge_grid(blocks, num_splits):
    """Blocks of a split merge: none of them has work when the context was not split (stage 1
    wrote the output), so launch one then -- at 128 sequences of short contexts the full grid
    of idle blocks cost 7.4 us a layer (ncu, H200)."""
    return T.if_then_else(num_splits > 1, blocks, T.min(blocks, 1))


def _group_tile(group: int, vec: int) -> int:
    """Query heads per block: the largest divisor of the GQA group that keeps
    q and the accumulators in registers (8 heads x 8 values each)."""
    cap = 4 if vec > 8 else 8
    return max(g for g in range(1, min(group, cap) + 1) if group % g == 0)


def cuda_decode_supported(head_dim: int, dtype: str) -> bool:
    """The lane mapping needs head_dim / (values per lane) to divide a warp."""
    return dtype in C_TYPES and head_dim in (32, 64, 128, 256)


def paged_decode_attention_cuda(kv_heads: int, q_heads: int, head_dim: int, dtype: str, page_size: int = 16):
    if not cuda_decode_supported(head_dim, dtype):
        raise ValueError(f"CUDA decode attention: head_dim {head_dim} / dtype {dtype} not supported (32/64/128/256; {', '.join(C_TYPES)})")
    H, D = q_heads, head_dim
    vec = (4 if dtype == "float32" else 8) * (2 if D >= 256 else 1)
    G = _group_tile(q_heads // kv_heads, vec)
    chunks = q_heads // kv_heads // G
    ct = C_TYPES[dtype]
    partial = f"kiln::attn_decode_partial<{ct}, {D}, {G}, {NUM_WARPS}>"
    merge = f"kiln::split_merge<{ct}, {D}, {D}, {MERGE_GROUPS}>"

    def num_splits(nnz_pages, B):
        by_keys = T.ceildiv(nnz_pages * page_size, B * MIN_KEYS_PER_SPLIT)
        by_gpu = T.ceildiv(TARGET_BLOCKS, B * kv_heads * chunks)
        return T.max(T.min(T.min(by_keys, by_gpu), MAX_SPLITS), 1)

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
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "kiln_paged_decode_attention"})
        B = T.int32()
        nnz_pages = T.int32()
        max_pages = T.int32()
        o0 = T.int64()
        o1 = T.int32()
        o2 = T.int32()
        o3 = T.int32()
        o4 = T.int32()
        o5 = T.int32()
        q = T.match_buffer(var_q, (B, H, D), dtype)
        pages = T.match_buffer(var_pages, (max_pages, 2, kv_heads, page_size, D), dtype, elem_offset=o0)
        page_indptr = T.match_buffer(var_page_indptr, (B + 1,), "int32", elem_offset=o1)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=o2)
        last_page_len = T.match_buffer(var_length_info, (B,), "int32", elem_offset=o3)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (B,), "int32", elem_offset=o4)
        q_rope_position = T.match_buffer(var_q_rope_position, (B,), "int32", elem_offset=o5)
        output = T.match_buffer(var_output, (B, H, D), dtype)
        lse = T.match_buffer(var_lse, (B, H), "float32")
        ws = T.alloc_buffer((B * H * num_splits(nnz_pages, B) * (D + 2),), "float32")
        for bx in T.thread_binding(B * kv_heads * chunks * num_splits(nnz_pages, B), thread="blockIdx.x"):
            for tx in T.thread_binding(NUM_WARPS * 32, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", partial, T.address_of(q[0, 0, 0]), T.address_of(pages[0, 0, 0, 0, 0]),
                                         T.address_of(page_indptr[0]), T.address_of(page_values[0]), T.address_of(last_page_len[0]),
                                         ws.access_ptr("rw"), T.address_of(output[0, 0, 0]), T.address_of(lse[0, 0]),
                                         kv_heads, chunks, page_size, num_splits(nnz_pages, B), sm_scale))
        for bx in T.thread_binding(merge_grid(B * H, num_splits(nnz_pages, B)), thread="blockIdx.x"):
            for tx in T.thread_binding(D * MERGE_GROUPS, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", merge, ws.access_ptr("rw"), T.address_of(output[0, 0, 0]), T.address_of(lse[0, 0]),
                                         num_splits(nnz_pages, B)))

    return paged_decode_attention


def ragged_prefill_supported(head_dim: int, dtype: str) -> bool:
    """mma.sync takes 16-bit inputs; registers (Q and O fragments per lane) cap head_dim at 128."""
    return dtype in ("bfloat16", "float16") and head_dim in (64, 128)


def ragged_prefill_attention_cuda(kv_heads: int, q_heads: int, head_dim: int, dtype: str):
    """TVM's batch_prefill_ragged_kv contract (the KV cache calls it unchanged),
    computed by kiln::attn_prefill_fa2 (cuda/attention_prefill.cuh: FlashAttention-2 on mma.sync)."""
    if not ragged_prefill_supported(head_dim, dtype):
        raise ValueError(f"CUDA prefill attention: head_dim {head_dim} / dtype {dtype} not supported")
    H, D = q_heads, head_dim
    fn = f"kiln::attn_prefill_fa2<{C_TYPES[dtype]}, {D}>"
    smem_bytes = (64 * D + 2 * 2 * 64 * D) * 2  # kiln::attn_fa2_smem_bytes<D>(): the Q tile and 2-deep K / V rings

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
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "kiln_ragged_prefill_attention"})
        B = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        o1 = T.int32()
        o2 = T.int32()
        o3 = T.int32()
        o4 = T.int32()
        q = T.match_buffer(var_q, (qo_len, H, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (B + 1,), "int32", elem_offset=o1)
        k = T.match_buffer(var_k, (kv_len, kv_heads, D), dtype)
        v = T.match_buffer(var_v, (kv_len, kv_heads, D), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (B + 1,), "int32", elem_offset=o2)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=o3)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (B,), "int32", elem_offset=o4)
        output = T.match_buffer(var_output, (qo_len, H, D), dtype)
        lse = T.match_buffer(var_lse, (qo_len, H), "float32")
        # at most ceil(total / 64) + B row tiles (each sequence rounds up once)
        for bx in T.thread_binding(T.ceildiv(qo_len, 64) + B, thread="blockIdx.x"):
            for by in T.thread_binding(H, thread="blockIdx.y"):
                for tx in T.thread_binding(128, thread="threadIdx.x"):
                    smem = T.alloc_buffer((smem_bytes,), "uint8", scope="shared.dyn")
                    T.evaluate(T.call_extern("void", fn, T.address_of(q[0, 0, 0]), T.address_of(q_indptr[0]), T.address_of(k[0, 0, 0]),
                                             T.address_of(v[0, 0, 0]), T.address_of(kv_indptr[0]), T.address_of(output[0, 0, 0]),
                                             T.address_of(lse[0, 0]), B, H, kv_heads, causal, sm_scale, smem.access_ptr("rw")))

    return ragged_prefill_attention
