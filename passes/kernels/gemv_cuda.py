"""Decode GEMV kernels for CUDA with their neighbours fused in (TIR wrappers
around kernels/cuda/gemv.cuh; the pass passes/cuda_projections.py, CudaProjections,
puts them in the graph).

    rmsnorm_gemv(x, norm_w, W)            -> W @ rms_norm(x, norm_w)         (qkv, gate/up)
    gemv_residual(x, W, r)                -> r + W @ x                        (o_proj)
    silu_mul_gemv_residual(gu, W, r)      -> r + W @ (silu(gate) * up)       (down)

All tensors are in the compute dtype (bf16/fp16/fp32), x  # [1, 1, K], W  # [N, K].
(xs, the SwiGLU staging buffer, is unused by the other two: they get x's
pointer in its place and no shared memory.)
Why: at batch 1 each of these neighbours was its own kernel of ~3 us (ncu,
Llama-3-8B on H100: 65 RMSNorms 0.23 ms, SwiGLU 0.10 ms per token), launch-
and latency-bound work next to GEMVs that read the weights at 3 TB/s; fused,
they cost one staging pass over a K-vector that is already in L2.
"""

from __future__ import annotations

from ...tvm_compat import compiler
from .attention_cuda import C_TYPES

_t = compiler()
T = _t.T

NUM_WARPS = 4
ROWS_PER_WARP = 4
MODES = {"plain": 0, "rmsnorm": 1, "silu_mul": 2}


def gemv_supported(K: int, dtype: str) -> bool:
    """Rows must be whole 16-byte chunks."""
    return dtype in C_TYPES and K % (16 // (4 if dtype == "float32" else 2)) == 0


def _callee(mode: str, K: int, dtype: str, residual: bool) -> str:
    return f"kiln::gemv<{C_TYPES[dtype]}, {MODES[mode]}, {K}, {NUM_WARPS}, {ROWS_PER_WARP}, {'true' if residual else 'false'}>"


def _blocks(N: int) -> int:
    return (N + NUM_WARPS * ROWS_PER_WARP - 1) // (NUM_WARPS * ROWS_PER_WARP)


def rmsnorm_gemv(K: int, N: int, dtype: str, eps: float):
    fn, nb = _callee("rmsnorm", K, dtype, False), _blocks(N)

    @T.prim_func
    def kiln_rmsnorm_gemv(x: T.Buffer((1, 1, K), dtype), norm_w: T.Buffer((K,), dtype), w: T.Buffer((N, K), dtype), y: T.Buffer((1, 1, N), dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # 8: opaque, never fused
        for bx in T.thread_binding(nb, thread="blockIdx.x"):
            for tx in T.thread_binding(NUM_WARPS * 32, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", fn, T.address_of(x[0, 0, 0]), T.address_of(norm_w[0]), T.address_of(w[0, 0]),
                                         T.address_of(y[0, 0, 0]), T.address_of(y[0, 0, 0]), T.address_of(x[0, 0, 0]), N, T.float32(eps)))

    return kiln_rmsnorm_gemv


def gemv_residual(K: int, N: int, dtype: str):
    fn, nb = _callee("plain", K, dtype, True), _blocks(N)

    @T.prim_func
    def kiln_gemv_residual(x: T.Buffer((1, 1, K), dtype), w: T.Buffer((N, K), dtype), r: T.Buffer((1, 1, N), dtype), y: T.Buffer((1, 1, N), dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # 8: opaque, never fused
        for bx in T.thread_binding(nb, thread="blockIdx.x"):
            for tx in T.thread_binding(NUM_WARPS * 32, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", fn, T.address_of(x[0, 0, 0]), T.address_of(x[0, 0, 0]), T.address_of(w[0, 0]),
                                         T.address_of(r[0, 0, 0]), T.address_of(y[0, 0, 0]), T.address_of(x[0, 0, 0]), N, T.float32(0)))

    return kiln_gemv_residual


def silu_mul_gemv_residual(K: int, N: int, dtype: str):
    fn, nb = _callee("silu_mul", K, dtype, True), _blocks(N)

    @T.prim_func
    def kiln_silu_mul_gemv_residual(gu: T.Buffer((1, 1, 2 * K), dtype), w: T.Buffer((N, K), dtype), r: T.Buffer((1, 1, N), dtype),
                                    y: T.Buffer((1, 1, N), dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # 8: opaque, never fused
        for bx in T.thread_binding(nb, thread="blockIdx.x"):
            for tx in T.thread_binding(NUM_WARPS * 32, thread="threadIdx.x"):
                xs = T.alloc_buffer((K,), dtype, scope="shared.dyn")
                T.evaluate(T.call_extern("void", fn, T.address_of(gu[0, 0, 0]), T.address_of(gu[0, 0, 0]), T.address_of(w[0, 0]),
                                         T.address_of(r[0, 0, 0]), T.address_of(y[0, 0, 0]), xs.access_ptr("rw"), N, T.float32(0)))

    return kiln_silu_mul_gemv_residual


# --- quantized weights (kernels/cuda/qgemv.cuh) ---------------------------------
Q_NUM_WARPS = 4
Q_ROWS_PER_WARP = 4


QGEMV_CODES = {"4": 4, "8": 8, "f8": 9}  # code kind -> qgemv.cuh's BITS (9: kiln::kF8, e4m3)
QGEMV_SUPER = "4k"  # q4k: qgemv.cuh's qgemv4k; its "group" here is the super-block


def qgemv_supported(K: int, group: int, code: str, dtype: str) -> bool:
    if code == QGEMV_SUPER:
        return dtype in C_TYPES and group % 32 == 0 and K % group == 0
    unit = 32 if code == "4" else 16  # weights per 16-byte unit of codes
    return dtype in C_TYPES and code in QGEMV_CODES and K % unit == 0 and group % unit == 0 and K % group == 0


def qgemv_mma_config(K: int, N: int, group: int, code: str, dtype: str) -> tuple[int, int] | None:
    """(warps per block, steps per round) of qgemv.cuh's tensor-core q4 GEMV for this shape, or None
    where it does not apply (fp32 activations, other codes, K not in 128-weight steps: the float path;
    fp16, which the kernel takes too, is not built for CUDA yet).
    Measured on the H200 (benchmarks/NOTES.md, "q4 decode GEMV on the tensor cores"): 4 warps x 2 steps
    for N >= 16384 (gate/up, LM head), 16 x 1 for long rows (down, K >= 8192), else 8 x 2; the first
    whose rounds divide the row's steps."""
    if code != "4" or dtype != "bfloat16" or K % 128 or group not in (32, 64, 128):
        return None
    steps = K // 128
    first = [(4, 2)] if N >= 16384 else [(16, 1)] if steps >= 64 else [(8, 2)]
    for nw, u in (*first, (8, 2), (8, 1), (4, 2), (4, 1), (2, 1), (1, 1)):
        if steps % (nw * u) == 0:  # (groups of 32-128 and u <= 2: a round's scales are 1-8 per row, one vector)
            return nw, u
    return None


def qgemv(K: int, N: int, group: int, code: str, dtype: str, out_dtype: str, mma: bool = True, residual: bool = False):
    """y  # [1, 1, N] out_dtype = x  # [1, 1, K] dtype @ dequant(q, s[, z])^T, decode (batch 1).
    Same arguments as the NT_qmatmul TE kernel it replaces (q4: q, s, z; q8: q, s; fp8: q, s per row;
    q4k: q, s, z, d, m with `group` its super-block). mma: q4 codes under 16-bit activations on the
    tensor cores (qgemv_mma) where qgemv_mma_config has a shape for them. residual: one more argument
    r  # [1, 1, N] out_dtype, added to y in the kernel's epilogue (o / down projections + the residual
    stream: the separate add was 64 launches per Llama-3-8B step)."""
    nb = (N + Q_ROWS_PER_WARP - 1) // Q_ROWS_PER_WARP  # the block's warps split K of Q_ROWS_PER_WARP rows
    if code == QGEMV_SUPER:  # q4k: q, s (u8), z (i8) per 32, d, m per super-block (`group`)
        fn = f"kiln::qgemv4k<{C_TYPES[dtype]}, {C_TYPES[out_dtype]}, {K}, {group}, {Q_NUM_WARPS}, {Q_ROWS_PER_WARP}>"
        nu, nsb = K // 32, K // group

        @T.prim_func
        def kiln_qgemv4k(x: T.Buffer((1, 1, K), dtype), q: T.Buffer((N, K // 8), "uint32"), s: T.Buffer((N, nu), "uint8"),
                         z: T.Buffer((N, nu), "int8"), d: T.Buffer((N, nsb), "float16"), m: T.Buffer((N, nsb), "float16"),
                         y: T.Buffer((1, 1, N), out_dtype)):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # 8: opaque, never fused
            for bx in T.thread_binding(nb, thread="blockIdx.x"):
                for tx in T.thread_binding(Q_NUM_WARPS * 32, thread="threadIdx.x"):
                    T.evaluate(T.call_extern("void", fn, T.address_of(x[0, 0, 0]), T.address_of(q[0, 0]), T.address_of(s[0, 0]),
                                             T.address_of(z[0, 0]), T.address_of(d[0, 0]), T.address_of(m[0, 0]),
                                             T.address_of(y[0, 0, 0]), N))

        @T.prim_func
        def kiln_qgemv4k_residual(x: T.Buffer((1, 1, K), dtype), q: T.Buffer((N, K // 8), "uint32"), s: T.Buffer((N, nu), "uint8"),
                                  z: T.Buffer((N, nu), "int8"), d: T.Buffer((N, nsb), "float16"), m: T.Buffer((N, nsb), "float16"),
                                  r: T.Buffer((1, 1, N), out_dtype), y: T.Buffer((1, 1, N), out_dtype)):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            for bx in T.thread_binding(nb, thread="blockIdx.x"):
                for tx in T.thread_binding(Q_NUM_WARPS * 32, thread="threadIdx.x"):
                    T.evaluate(T.call_extern("void", fn, T.address_of(x[0, 0, 0]), T.address_of(q[0, 0]), T.address_of(s[0, 0]),
                                             T.address_of(z[0, 0]), T.address_of(d[0, 0]), T.address_of(m[0, 0]),
                                             T.address_of(y[0, 0, 0]), N, T.address_of(r[0, 0, 0])))

        return kiln_qgemv4k_residual if residual else kiln_qgemv4k
    fn = f"kiln::qgemv<{C_TYPES[dtype]}, {C_TYPES[out_dtype]}, {QGEMV_CODES[code]}, {K}, {group}, {Q_NUM_WARPS}, {Q_ROWS_PER_WARP}>"
    ng = K // group
    # q8 / fp8 differ in the codes' and scales' dtypes only
    q_dtype, s_dtype = ("uint8", "float32") if code == "f8" else ("int8", "float16")

    if code == "4":
        threads = Q_NUM_WARPS * 32
        cfg = qgemv_mma_config(K, N, group, code, dtype) if mma else None
        if cfg is not None:  # on the tensor cores: one block per 16 rows, its nw warps in rounds of u steps
            nw, u = cfg
            fn = f"kiln::qgemv_mma<{C_TYPES[dtype]}, {C_TYPES[out_dtype]}, {K}, {group}, {nw}, 1, {u}>"
            nb, threads = (N + 15) // 16, nw * 32

        @T.prim_func
        def kiln_qgemv4(x: T.Buffer((1, 1, K), dtype), q: T.Buffer((N, K // 8), "uint32"), s: T.Buffer((N, ng), "float16"),
                        z: T.Buffer((N, ng), "float16"), y: T.Buffer((1, 1, N), out_dtype)):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # 8: opaque, never fused
            for bx in T.thread_binding(nb, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    T.evaluate(T.call_extern("void", fn, T.address_of(x[0, 0, 0]), T.address_of(q[0, 0]), T.address_of(s[0, 0]),
                                             T.address_of(z[0, 0]), T.address_of(y[0, 0, 0]), N))

        @T.prim_func
        def kiln_qgemv4_residual(x: T.Buffer((1, 1, K), dtype), q: T.Buffer((N, K // 8), "uint32"), s: T.Buffer((N, ng), "float16"),
                                 z: T.Buffer((N, ng), "float16"), r: T.Buffer((1, 1, N), out_dtype), y: T.Buffer((1, 1, N), out_dtype)):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            for bx in T.thread_binding(nb, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    T.evaluate(T.call_extern("void", fn, T.address_of(x[0, 0, 0]), T.address_of(q[0, 0]), T.address_of(s[0, 0]),
                                             T.address_of(z[0, 0]), T.address_of(y[0, 0, 0]), N, T.address_of(r[0, 0, 0])))

        return kiln_qgemv4_residual if residual else kiln_qgemv4

    @T.prim_func
    def kiln_qgemv8(x: T.Buffer((1, 1, K), dtype), q: T.Buffer((N, K), q_dtype), s: T.Buffer((N, ng), s_dtype),
                    y: T.Buffer((1, 1, N), out_dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # 8: opaque, never fused
        for bx in T.thread_binding(nb, thread="blockIdx.x"):
            for tx in T.thread_binding(Q_NUM_WARPS * 32, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", fn, T.address_of(x[0, 0, 0]), T.address_of(q[0, 0]), T.address_of(s[0, 0]),
                                         T.address_of(s[0, 0]), T.address_of(y[0, 0, 0]), N))  # z: unused

    @T.prim_func
    def kiln_qgemv8_residual(x: T.Buffer((1, 1, K), dtype), q: T.Buffer((N, K), q_dtype), s: T.Buffer((N, ng), s_dtype),
                             r: T.Buffer((1, 1, N), out_dtype), y: T.Buffer((1, 1, N), out_dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for bx in T.thread_binding(nb, thread="blockIdx.x"):
            for tx in T.thread_binding(Q_NUM_WARPS * 32, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", fn, T.address_of(x[0, 0, 0]), T.address_of(q[0, 0]), T.address_of(s[0, 0]),
                                         T.address_of(s[0, 0]), T.address_of(y[0, 0, 0]), N, T.address_of(r[0, 0, 0])))

    return kiln_qgemv8_residual if residual else kiln_qgemv8


def q4k_expand(K: int, N: int, sb: int):
    """q4k's (s, z, d, m) -> fp16 scale and minimum per 32 weights, q4g32's arrays (qgemv.cuh q4k_expand):
    a prompt's projections then run on the 4-bit tensor-core GEMM (kernels/gemm_cuda.qgemm, group 32)."""
    nu, nsb = K // 32, K // sb
    total = N * nu
    nb = (total + 255) // 256
    fn = f"kiln::q4k_expand<{sb}>"

    @T.prim_func
    def kiln_q4k_expand(s: T.Buffer((N, nu), "uint8"), z: T.Buffer((N, nu), "int8"), d: T.Buffer((N, nsb), "float16"),
                        m: T.Buffer((N, nsb), "float16"), so: T.Buffer((N, nu), "float16"), zo: T.Buffer((N, nu), "float16")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # 8: opaque, never fused
        for bx in T.thread_binding(nb, thread="blockIdx.x"):
            for tx in T.thread_binding(256, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", fn, T.address_of(s[0, 0]), T.address_of(z[0, 0]), T.address_of(d[0, 0]),
                                         T.address_of(m[0, 0]), T.address_of(so[0, 0]), T.address_of(zo[0, 0]), nu, T.int64(total)))

    return kiln_q4k_expand
