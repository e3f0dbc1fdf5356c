"""Integer-dot quantized matmuls for CPUs: TIR wrappers around kernels/cpu/qdot*.c (the pass
passes/cpu_projections.py, CpuQuantMatmul, puts them in place of the models' quantized
projections; compiler/cpu_codegen.py compiles them for each CPU target and links them into
the target's library).

    qdot(K, N, group, "q8")     x  # [A, S, K] f32, q  # [N, K] int8, s  # [N, K/32] f16        -> y  # [A, S, N] f32
    qdot(K, N, group, "q4")     x  # [A, S, K] f32, q  # [N, K/8] u32, s, z  # [N, K/g] f16     -> y
    qdot(K, N, sb, "q4k")       x, q, s  # [N, K/32] u8, z  # [N, K/32] i8, d, m  # [N, K/sb] f16 -> y

A and S symbolic: one wrapper serves decode ([1, 1, K]), prompts ([1, s, K]) and
decode_batch ([B, 1, K]) -- rows are contiguous in all three.

Why: kiln's TIR quantized GEMVs decoded every code to fp32 and used fp32 FMAs (about four
instructions per eight weights, compute-bound at 0.56-0.81x llama.cpp's decode on two
cores); the integer dots take 64 weights in about seven (benchmarks/NOTES.md).
"""

from __future__ import annotations

from ...tvm_compat import compiler

_t = compiler()
T = _t.T

# weight format name -> the kernel's code kind (passes/quant/formats: q8 symmetric int8 per 32,
# q4g32 / q4g128 int4 with a minimum, q4k int4 under 8-bit codes of scale and minimum per 32)
QDOT_KINDS = {"q8": "q8", "q4g32": "q4", "q4g128": "q4", "q4k": "q4k"}


def qdot_supported(fmt_name: str, K: int, group: int) -> bool:
    """Blocks of 32 activations meet whole code groups: q8 groups of 32, q4 rows of whole
    64-value chunks and groups of 32 or more (SmolLM2's 576 with g128 -> 64: yes); q4k rows of
    whole 64-value chunks and super-blocks (`group` here) of them (576's 192: yes; 320's 160: no)."""
    kind = QDOT_KINDS.get(fmt_name)
    if kind == "q8":
        return K % 32 == 0 and group == 32
    if kind == "q4":
        return K % 64 == 0 and group % 32 == 0 and K % group == 0
    if kind == "q4k":
        return K % 64 == 0 and group % 64 == 0 and K % group == 0
    return False


def qdot(K: int, N: int, group: int, kind: str):
    """The call_tir callee for one [N, K] matrix (same arguments as the NT_qmatmul TE kernel)."""
    ng = K // group

    if kind == "q8":
        @T.prim_func
        def kiln_qdot_q8(var_x: T.handle, q: T.Buffer((N, K), "int8"), s: T.Buffer((N, ng), "float16"), var_y: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # 8: opaque, never fused
            A = T.int64()
            S = T.int64()
            x = T.match_buffer(var_x, (A, S, K), "float32")
            y = T.match_buffer(var_y, (A, S, N), "float32")
            rc = T.call_extern("int32", "kiln_cpu_qmatmul_q8", x.data, q.data, s.data, y.data, A * S, T.int64(N), T.int64(K))
            assert rc == 0, "kiln_cpu_qmatmul_q8: out of memory for the quantized activations"

        return kiln_qdot_q8

    if kind == "q4k":
        nb, nsb = K // 32, K // group

        @T.prim_func
        def kiln_qdot_q4k(var_x: T.handle, q: T.Buffer((N, K // 8), "uint32"), s: T.Buffer((N, nb), "uint8"),
                          z: T.Buffer((N, nb), "int8"), d: T.Buffer((N, nsb), "float16"), m: T.Buffer((N, nsb), "float16"),
                          var_y: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            A = T.int64()
            S = T.int64()
            x = T.match_buffer(var_x, (A, S, K), "float32")
            y = T.match_buffer(var_y, (A, S, N), "float32")
            rc = T.call_extern("int32", "kiln_cpu_qmatmul_q4k", x.data, q.data, s.data, z.data, d.data, m.data, y.data,
                               A * S, T.int64(N), T.int64(K), T.int64(group))
            assert rc == 0, "kiln_cpu_qmatmul_q4k: out of memory for the quantized activations"

        return kiln_qdot_q4k

    @T.prim_func
    def kiln_qdot_q4(var_x: T.handle, q: T.Buffer((N, K // 8), "uint32"), s: T.Buffer((N, ng), "float16"),
                     z: T.Buffer((N, ng), "float16"), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        A = T.int64()
        S = T.int64()
        x = T.match_buffer(var_x, (A, S, K), "float32")
        y = T.match_buffer(var_y, (A, S, N), "float32")
        rc = T.call_extern("int32", "kiln_cpu_qmatmul_q4", x.data, q.data, s.data, z.data, y.data, A * S, T.int64(N),
                           T.int64(K), T.int64(group))
        assert rc == 0, "kiln_cpu_qmatmul_q4: out of memory for the quantized activations"

    return kiln_qdot_q4
