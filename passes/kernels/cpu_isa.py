"""What a CPU target's vector unit holds: the one fact kernels and schedule
rules both size their loops by (kept here, below both)."""

from __future__ import annotations

from ...tvm_compat import compiler


def vector_lanes(target, dtype_bits: int = 32) -> int:
    """Elements of `dtype_bits` in the target's widest vector register (x86:
    16 fp32 on AVX-512, 8 on AVX/AVX2, 4 on SSE; other CPUs: 128-bit)."""
    t = compiler()
    feats = set(t.tvm.target.codegen.llvm_get_cpu_features(target))
    bits = 512 if "avx512f" in feats else 256 if "avx" in feats else 128
    return bits // dtype_bits
