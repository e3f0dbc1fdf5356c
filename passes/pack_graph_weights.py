"""PackGraphWeights: the float32 params that only ever feed matmuls as their weight (ONNX MatMul,
Gemm, and after ConvAsGemm every one-group 2-D convolution) are stored in the panel layout of
kiln's C GEMM (passes/kernels/sgemm_cpu.PackedPanels: [ceil(N / 16), K, 16]), and those matmuls
call it (kernels/cpu/sgemm.c) -- CPU graphs (compiler/onnx_build.py), after QuantizeGraphWeights
when --quant is given, so it takes the matrices left in float.

    y = matmul(x [..., K], B [K, N])   =>   y = kiln_sgemm(x [M, K], P.p [N/16, K, 16]) viewed [..., N]

Same plan and param rewrite as QuantizeGraphWeights (a param with any other use stays as it
is); the "format" packs instead of quantizing, losslessly, once when the weights file is written.

Why: TVM's GEMM schedule (cpu_rules.CpuMatmul) packed its weight tile on every call and reached
~110-120 GFLOP/s on BERT-base's projections on two znver2 cores; the C micro-kernel on weights
packed once reaches ~170 (benchmarks/NOTES.md, Session 20).
"""

from __future__ import annotations

from .kernels.sgemm_cpu import PACKED_PANELS
from .quantize_graph_weights import QuantizeGraphWeights


class PackGraphWeights(QuantizeGraphWeights):
    """See the module docstring. `num_inputs`: the graph's inputs (before the params in main)."""

    def __init__(self, num_inputs: int, takes=None):
        super().__init__(PACKED_PANELS, num_inputs, takes)


__all__ = ["PackGraphWeights"]
