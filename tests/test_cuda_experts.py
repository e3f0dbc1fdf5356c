"""CudaExperts (passes/cuda_experts.py): the mixture-of-experts layers of a CUDA graph
run on kiln's kernels (kernels/cuda/moe.cuh), matched by the attributes moe.py sets.
Before/after IR of whole tiny models; the kernels' numbers are checked on the GPU
machine against the CPU artifact (benchmarks/cross_device_check.py; the last run's
output is in benchmarks/results/moe_cuda_h200-2026-12-01.txt)."""

from __future__ import annotations

import dataclasses

import pytest

from kiln.compiler.build import read_model
from kiln.compiler.options import CompileOptions
from kiln.compiler.progress import Progress
from kiln.compiler.stages import export_graphs
from kiln.compiler.target import CompileTarget
from kiln.passes.cuda_experts import CudaExperts
from kiln.passes.cuda_projections import CudaProjections
from kiln.tvm_compat import compiler

t = compiler()


def _cuda_module(ckpt, tmp_path, dtype: str, quant: str | None = None):
    """The model's Relax module for sm_90 after CudaProjections and CudaExperts. (Read for the
    CPU, then given the CUDA target: parsing `cuda:sm_90` needs TVM's CUDA plugin loaded before
    TVM, which the kiln CLI does and a test process cannot.)"""
    opts = CompileOptions(model=ckpt, output=tmp_path / "x.kiln", target="llvm", dtype=dtype, quant=quant, quality_check=False)
    m = read_model(opts, Progress(quiet=True))
    assert m.kv_fmt is None
    m = dataclasses.replace(m, targets=(CompileTarget("cuda", triple="x86_64-linux-gnu", arch="sm_90", archs=("sm_90",)),))
    (mod,), _ = export_graphs(m, opts.page_size)
    with m.targets[0].tvm_target():
        return CudaExperts()(CudaProjections()(mod))


def _calls(mod, fn: str) -> str:
    return mod[fn].script()


@pytest.mark.parametrize(("variant", "dtype", "renorm"), [
    ("mixtral_q", "bfloat16", 1),   # 4 experts top-2, renormalised; hidden 64, width 96
    ("qwen3_moe", "float32", 0),    # 8 experts top-3, softmax over all 8 (norm_topk_prob False); width 44
])
def test_moe_layers_run_on_kiln_kernels(tiny_checkpoint, tmp_path, variant, dtype, renorm):
    """Decode: the expert GEMVs. A prompt: tokens grouped by expert and the tensor-core
    expert GEMM where gemm.cuh's tiles fit (16-bit, widths multiples of 32), else the TE
    kernels. Routing: the one-warp top-k everywhere."""
    mod = t.relax.transform.DeadCodeElimination()(_cuda_module(tiny_checkpoint(variant), tmp_path, dtype))
    grouped = dtype == "bfloat16"
    for fn in ("decode", "prefill"):
        s = _calls(mod, fn)
        assert "kiln_topk_softmax_" in s and f"_{renorm}," in s.split("kiln_topk_softmax_")[1][:20], fn
        assert "call_tir(topk_experts" not in s and "call_tir(routing_weights" not in s, fn
        gemv = fn == "decode"
        assert ("kiln_expert_gate_up_silu_" in s and "kiln_expert_down_" in s) == gemv, fn
        if gemv:  # the residual add is the down GEMV's epilogue: kernel ..._1, taking r
            assert f"_{dtype}_1, (" in s.split("kiln_expert_down_")[1][:60], s.split("kiln_expert_down_")[1][:60]
        assert ("kiln_expert_route_" in s and "kiln_expert_gemm_" in s and "kiln_expert_combine_" in s) == (grouped and not gemv), fn
        # what is left of the TE expert kernels: a float32 prompt's (no tensor-core tile for it)
        assert ("call_tir(expert_gate_up" in s) == (not gemv and not grouped), fn


@pytest.mark.parametrize("quant", ["q8", "q4g32", "fp8"])
def test_quantized_experts_decode_on_kiln_kernels(tiny_checkpoint, tmp_path, quant):
    """Quantized expert stacks: decode on the quantized expert GEMVs (kernels/cuda/qmoe.cuh, the
    format's code kind and group in the kernel's name), the residual folded in; a prompt
    grouped and on the quantized tensor-core expert GEMM. Routing: the one-warp top-k."""
    mod = t.relax.transform.DeadCodeElimination()(_cuda_module(tiny_checkpoint("mixtral_q"), tmp_path, "bfloat16", quant=quant))
    code = {"q8": "8_32", "q4g32": "4_32", "fp8": "f8_64"}[quant]  # group of the gate/up stack (K = hidden 64)
    dec, pre = _calls(mod, "decode"), _calls(mod, "prefill")
    assert "kiln_topk_softmax_" in dec and "kiln_topk_softmax_" in pre
    assert f"kiln_qexpert_gate_up_silu_{code}_" in dec and "kiln_qexpert_down_" in dec, dec
    assert "_bfloat16_1, (" in dec.split("kiln_qexpert_down_")[1][:60]
    assert f"kiln_expert_qgemm_{code}_" in pre and "kiln_expert_route_" in pre and "call_tir(expert_gate_up" not in pre, pre
