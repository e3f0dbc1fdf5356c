"""RMSNorm and SwiGLU over many rows for CUDA: TIR wrappers around kernels/cuda/rows.cuh
(the pass passes/cuda_projections.py, CudaProjections, puts them in place of relax.nn.rms_norm
and of silu(split(h)[0]) * split(h)[1] where the rows are symbolic: a prompt's [1, s, K] or
decode_batch's [B, 1, K]; decode's static [1, 1, K] keeps its own path).

    rmsnorm_rows(x, w)   x  # [A, S, K], w  # [K]  -> like x
    silu_mul_rows(h, h)  h  # [A, S, 2F]          -> [A, S, F]   (h passed twice: the gate's
                                                      source and the up half's -- a one-input
                                                      call_tir would be taken for a reshape
                                                      candidate, which needs TIR blocks)

Why: dlight's schedules for them ran at 1.0-1.5 TB/s on the H200 (Llama-3-8B, 2048-token
prompt: 65 RMSNorms 1.95 ms and 32 SwiGLUs 3.9 ms of a ~63 ms time to first token).
"""

from __future__ import annotations

from ...tvm_compat import compiler
from .attention_cuda import C_TYPES

_t = compiler()
T = _t.T


def rows_supported(K: int, dtype: str) -> bool:
    """16-bit rows of whole warp passes (32 lanes x 8 values)."""
    return dtype in ("bfloat16", "float16") and K % 256 == 0


def rmsnorm_rows(K: int, dtype: str, eps: float):
    fn = f"kiln::rmsnorm_rows<{C_TYPES[dtype]}, {K}>"

    @T.prim_func
    def kiln_rmsnorm_rows(var_x: T.handle, w: T.Buffer((K,), dtype), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        A = T.int64()
        S = T.int64()
        x = T.match_buffer(var_x, (A, S, K), dtype)
        y = T.match_buffer(var_y, (A, S, K), dtype)
        for bx in T.thread_binding((A * S + 7) // 8, thread="blockIdx.x"):
            for tx in T.thread_binding(256, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", fn, T.address_of(x[0, 0, 0]), T.address_of(w[0]), T.address_of(y[0, 0, 0]),
                                         T.Cast("int32", A * S), T.float32(eps)))

    return kiln_rmsnorm_rows


def silu_mul_rows(F: int, dtype: str):
    fn = f"kiln::silu_mul_rows<{C_TYPES[dtype]}>"

    @T.prim_func
    def kiln_silu_mul_rows(var_h: T.handle, var_hu: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "op_pattern": 8})
        A = T.int64()
        S = T.int64()
        h = T.match_buffer(var_h, (A, S, 2 * F), dtype)
        hu = T.match_buffer(var_hu, (A, S, 2 * F), dtype)
        y = T.match_buffer(var_y, (A, S, F), dtype)
        for bx in T.thread_binding((A * S * F + 2047) // 2048, thread="blockIdx.x"):
            for tx in T.thread_binding(256, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", fn, T.address_of(h[0, 0, 0]), T.address_of(hu[0, 0, 0]), T.address_of(y[0, 0, 0]),
                                         T.Cast("int32", A * S), F))

    return kiln_silu_mul_rows
