"""Prefill GEMM on tensor cores for CUDA: TIR wrappers around
kernels/cuda/gemm.cuh (the pass passes/cuda_projections.py, CudaProjections, puts them
in the prefill graph in place of kiln's NT_matmul kernels).

    gemm(a, W)         a  # [1, M, K] (the prompt chunk) or [M, 1, K] (decode_batch: one token of
                       each of M sequences) -- M contiguous rows either way; W  # [N, K] -> like a, N wide
    gemm_residual(a, W, r)  -> r + a @ W^T
    gemm_rows(a, W[, r])    decode_batch's a  # [B, 1, K]: kernels/cuda/gemm_rows.cuh (the weight
                            on the MMA's 16-row side; read once per step at any B), out in the
                            weights' dtype or fp32 (the LM head)

Why: TVM 0.27's dlight Matmul rule tensorizes only fp16 (and that segfaults on
Llama-3-8B shapes), so bf16 prefill GEMMs ran on CUDA cores at ~29 TFLOP/s
(ncu: 1.0 s of a 1.44 s 2048-token prefill of Llama-3-8B).
"""

from __future__ import annotations

from ...tvm_compat import compiler
from .attention_cuda import C_TYPES
from .gemv_cuda import QGEMV_CODES  # code kind -> the CODE / BITS template value of both quantized kernels

_t = compiler()
T = _t.T

BM, BN = 128, 256
THREADS = 256
SMEM_BYTES = 3 * (BM + BN) * (32 + 8) * 2  # kiln::GEMM_SMEM_BYTES (3 stages)


def gemm_supported(K: int, dtype: str) -> bool:
    return dtype in ("bfloat16", "float16") and K % 32 == 0


def _callee(dtype: str, residual: bool) -> str:
    return f"kiln::gemm_tn<{C_TYPES[dtype]}, {'true' if residual else 'false'}>"


def gemm(K: int, N: int, dtype: str):
    fn, nb = _callee(dtype, False), (N + BN - 1) // BN

    @T.prim_func
    def kiln_gemm(var_a: T.handle, w: T.Buffer((N, K), dtype), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = T.int64()
        S = T.int64()
        a = T.match_buffer(var_a, (B, S, K), dtype)
        y = T.match_buffer(var_y, (B, S, N), dtype)
        for by in T.thread_binding((B * S + BM - 1) // BM, thread="blockIdx.y"):
            for bx in T.thread_binding(nb, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    smem = T.alloc_buffer((SMEM_BYTES,), "uint8", scope="shared.dyn")
                    T.evaluate(T.call_extern("void", fn, T.address_of(a[0, 0, 0]), T.address_of(w[0, 0]), T.address_of(y[0, 0, 0]),
                                             T.address_of(y[0, 0, 0]), T.Cast("int32", B * S), N, K, smem.access_ptr("rw")))

    return kiln_gemm


def gemm_residual(K: int, N: int, dtype: str):
    fn, nb = _callee(dtype, True), (N + BN - 1) // BN

    @T.prim_func
    def kiln_gemm_residual(var_a: T.handle, w: T.Buffer((N, K), dtype), var_r: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = T.int64()
        S = T.int64()
        a = T.match_buffer(var_a, (B, S, K), dtype)
        r = T.match_buffer(var_r, (B, S, N), dtype)
        y = T.match_buffer(var_y, (B, S, N), dtype)
        for by in T.thread_binding((B * S + BM - 1) // BM, thread="blockIdx.y"):
            for bx in T.thread_binding(nb, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    smem = T.alloc_buffer((SMEM_BYTES,), "uint8", scope="shared.dyn")
                    T.evaluate(T.call_extern("void", fn, T.address_of(a[0, 0, 0]), T.address_of(w[0, 0]), T.address_of(r[0, 0, 0]),
                                             T.address_of(y[0, 0, 0]), T.Cast("int32", B * S), N, K, smem.access_ptr("rw")))

    return kiln_gemm_residual


ROWS_N, ROWS_M, ROWS_THREADS = 32, 64, 256  # kiln::GROWS_N, GROWS_M, GROWS_WARPS * 32
ROWS_RED_FLOATS = 8 * 4 * 4 * 32  # kiln::GROWS_RED_FLOATS


def gemm_rows(K: int, N: int, dtype: str, residual: bool = False, out_dtype: str | None = None):
    """y  # [B, 1, N] (out_dtype: dtype or float32) = a  # [B, 1, K] @ W  # [N, K]^T (+ r  # [B, 1, N]),
    B symbolic: one token of each of B sequences (decode_batch). Two kernels, picked on the
    host by B (<= 8: one token tile per block, fewer registers); a token's result does not
    depend on B either way (kernels/cuda/gemm_rows.cuh: a fixed K split, summed in a fixed order)."""
    out_dtype = out_dtype or dtype
    res = "true" if residual else "false"
    small, large = (f"kiln::gemm_rows<{C_TYPES[dtype]}, {C_TYPES[out_dtype]}, {res}, {tt}>" for tt in (1, 8))
    nb = (N + ROWS_N - 1) // ROWS_N

    @T.prim_func
    def kiln_gemm_rows_residual(var_a: T.handle, w: T.Buffer((N, K), dtype), var_r: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = T.int64()
        a = T.match_buffer(var_a, (B, 1, K), dtype)
        r = T.match_buffer(var_r, (B, 1, N), dtype)
        y = T.match_buffer(var_y, (B, 1, N), out_dtype)
        if B <= 8:
            for by in T.thread_binding(nb, thread="blockIdx.y"):
                for tx in T.thread_binding(ROWS_THREADS, thread="threadIdx.x"):
                    red = T.alloc_buffer((ROWS_RED_FLOATS,), "float32", scope="shared")
                    T.evaluate(T.call_extern("void", small, T.address_of(a[0, 0, 0]), T.address_of(w[0, 0]), T.address_of(r[0, 0, 0]),
                                             T.address_of(y[0, 0, 0]), T.Cast("int32", B), N, K, red.access_ptr("rw")))
        else:
            for by in T.thread_binding(nb, thread="blockIdx.y"):
                for bx in T.thread_binding((B + ROWS_M - 1) // ROWS_M, thread="blockIdx.x"):
                    for tx in T.thread_binding(ROWS_THREADS, thread="threadIdx.x"):
                        red = T.alloc_buffer((ROWS_RED_FLOATS,), "float32", scope="shared")
                        T.evaluate(T.call_extern("void", large, T.address_of(a[0, 0, 0]), T.address_of(w[0, 0]), T.address_of(r[0, 0, 0]),
                                                 T.address_of(y[0, 0, 0]), T.Cast("int32", B), N, K, red.access_ptr("rw")))

    if residual:
        return kiln_gemm_rows_residual

    @T.prim_func
    def kiln_gemm_rows(var_a: T.handle, w: T.Buffer((N, K), dtype), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = T.int64()
        a = T.match_buffer(var_a, (B, 1, K), dtype)
        y = T.match_buffer(var_y, (B, 1, N), out_dtype)
        if B <= 8:  # r: unused (RESIDUAL is false), a's address in its place
            for by in T.thread_binding(nb, thread="blockIdx.y"):
                for tx in T.thread_binding(ROWS_THREADS, thread="threadIdx.x"):
                    red = T.alloc_buffer((ROWS_RED_FLOATS,), "float32", scope="shared")
                    T.evaluate(T.call_extern("void", small, T.address_of(a[0, 0, 0]), T.address_of(w[0, 0]), T.address_of(a[0, 0, 0]),
                                             T.address_of(y[0, 0, 0]), T.Cast("int32", B), N, K, red.access_ptr("rw")))
        else:
            for by in T.thread_binding(nb, thread="blockIdx.y"):
                for bx in T.thread_binding((B + ROWS_M - 1) // ROWS_M, thread="blockIdx.x"):
                    for tx in T.thread_binding(ROWS_THREADS, thread="threadIdx.x"):
                        red = T.alloc_buffer((ROWS_RED_FLOATS,), "float32", scope="shared")
                        T.evaluate(T.call_extern("void", large, T.address_of(a[0, 0, 0]), T.address_of(w[0, 0]), T.address_of(a[0, 0, 0]),
                                                 T.address_of(y[0, 0, 0]), T.Cast("int32", B), N, K, red.access_ptr("rw")))

    return kiln_gemm_rows


# --- quantized weights (gemm.cuh gemm_tn_q) ---------------------------------------
QSMEM_BYTES = 3 * (BM * (32 + 8) * 2 + BN * 32) + BN * (32 + 8) * 2  # kiln::QGEMM_SMEM_BYTES


def qgemm_supported(K: int, group: int, code: str, dtype: str) -> bool:
    return dtype in ("bfloat16", "float16") and code in QGEMV_CODES and K % 32 == 0 and group % 32 == 0 and K % group == 0


def qgemm(K: int, N: int, group: int, code: str, dtype: str):
    """y  # [1, M, N] = a  # [1, M, K] @ dequant(q, s[, z])^T on tensor cores, M symbolic
    (prefill). Same arguments as the NT_qmatmul TE kernel it replaces."""
    fn, nb, ng = f"kiln::gemm_tn_q<{C_TYPES[dtype]}, {QGEMV_CODES[code]}, {group}>", (N + BN - 1) // BN, K // group
    q_shape, q_dtype = ((N, K // 8), "uint32") if code == "4" else ((N, K), "uint8" if code == "f8" else "int8")
    s_dtype = "float32" if code == "f8" else "float16"

    if code == "4":
        @T.prim_func
        def kiln_qgemm4(var_a: T.handle, q: T.Buffer(q_shape, q_dtype), s: T.Buffer((N, ng), s_dtype), z: T.Buffer((N, ng), "float16"),
                        var_y: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            M = T.int64()
            a = T.match_buffer(var_a, (1, M, K), dtype)
            y = T.match_buffer(var_y, (1, M, N), dtype)
            for by in T.thread_binding((M + BM - 1) // BM, thread="blockIdx.y"):
                for bx in T.thread_binding(nb, thread="blockIdx.x"):
                    for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                        smem = T.alloc_buffer((QSMEM_BYTES,), "uint8", scope="shared.dyn")
                        T.evaluate(T.call_extern("void", fn, T.address_of(a[0, 0, 0]), T.address_of(q[0, 0]), T.address_of(s[0, 0]),
                                                 T.address_of(z[0, 0]), T.address_of(y[0, 0, 0]), T.Cast("int32", M), N, K,
                                                 smem.access_ptr("rw")))

        return kiln_qgemm4

    @T.prim_func
    def kiln_qgemm8(var_a: T.handle, q: T.Buffer(q_shape, q_dtype), s: T.Buffer((N, ng), s_dtype), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        M = T.int64()
        a = T.match_buffer(var_a, (1, M, K), dtype)
        y = T.match_buffer(var_y, (1, M, N), dtype)
        for by in T.thread_binding((M + BM - 1) // BM, thread="blockIdx.y"):
            for bx in T.thread_binding(nb, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    smem = T.alloc_buffer((QSMEM_BYTES,), "uint8", scope="shared.dyn")
                    T.evaluate(T.call_extern("void", fn, T.address_of(a[0, 0, 0]), T.address_of(q[0, 0]), T.address_of(s[0, 0]),
                                             T.address_of(s[0, 0]), T.address_of(y[0, 0, 0]), T.Cast("int32", M), N, K,
                                             smem.access_ptr("rw")))  # z: unused

    return kiln_qgemm8
