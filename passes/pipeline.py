"""The compile pipeline: one ordered, named list of phases.

Each phase is a module-level pass over the Relax IRModule. `run_pipeline`
applies them in order and, with a dump directory, writes the IR after each
phase as NN_name.py (TVMScript) so any step can be grepped and diffed.

Order matters and is measured: FuseTransposeMatmul must run before
legalization, otherwise `x @ W.T` lowers to a materialised transpose plus a
matmul that no GEMV rule recognises (12x slower on H100, per the CUDA notes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..tvm_compat import compiler
from .cpu_projections import CpuQuantMatmul
from .cuda_experts import CudaExperts
from .cuda_projections import CudaProjections
from .emulate_fp8_activations import EmulateFp8Activations
from .observe_projection_inputs import ObserveProjectionInputs
from .schedule_tir import ScheduleTIR


@dataclass(frozen=True)
class PipelineOptions:
    """Explicit pass state (no globals, no environment variables inside passes)."""

    target: object  # tvm Target
    dump_ir: Path | None = None
    cuda_gemm: bool = True  # prefill projections on kiln's tensor-core GEMM (False: dlight's Matmul)
    cuda_gemv: bool = False  # decode projections on kiln's fused GEMVs (measured slower than dlight's GEMV so far)
    cuda_qgemv: str = "4,4k,f8"  # quantized decode projections on kiln's qgemv.cuh for these code kinds ("4", "4k", "8", "f8"): 4-bit and fp8 beat dlight, int8 does not
    cuda_qgemv_mma: bool = True  # q4 decode GEMVs under 16-bit activations on the tensor cores (qgemv.cuh qgemv_mma; False: the float path)
    cuda_wgmma: bool = False  # prompt GEMMs on Hopper's wgmma (kernels/cuda/gemm_wg.cuh): only when every arch built is sm_90
    cuda_fp8_act: bool = True  # with wgmma: fp8 weights meet e4m3 activations on fp8 wgmma (False: bf16 activations, widened codes)
    cpu_intdot: bool = True  # CPU quantized projections on integer dot products (kernels/cpu/qdot.c; False: fp32 FMAs on decoded codes)
    cuda_experts: bool = True  # MoE layers on kiln's expert kernels (passes/cuda_experts.py; False: dlight's generic rules)
    observe: bool = False  # a calibration build: projection inputs pass through kiln.calib.observe (passes/observe_projection_inputs.py)
    emulate_fp8_act: bool = False  # the quality gate's CPU variant of an fp8 compile for Hopper: e4m3 projection inputs (passes/emulate_fp8_activations.py)
    extra_rules: tuple = ()  # schedule rules tried after kiln's specific ones, before the catch-alls (ONNX graphs: passes/cpu_graph_rules.py)
    on_phase: Callable[[str], None] | None = field(default=None, compare=False)


def phases(opts: PipelineOptions) -> list[tuple[str, object]]:
    t = compiler()
    rx = t.relax.transform
    cuda = opts.target.kind.name == "cuda"
    return [
        *([("observe_projection_inputs", ObserveProjectionInputs())] if opts.observe else []),
        *([("emulate_fp8_activations", EmulateFp8Activations())] if opts.emulate_fp8_act and not cuda else []),
        *([("cuda_projections", CudaProjections(gemm=opts.cuda_gemm, gemv=opts.cuda_gemv, qgemv=opts.cuda_qgemv, wgmma=opts.cuda_wgmma,
                                                              qgemv_mma=opts.cuda_qgemv_mma, fp8_act=opts.cuda_fp8_act))] if cuda else []),
        *([("cpu_quant_matmul", CpuQuantMatmul())] if not cuda and opts.cpu_intdot else []),
        *([("cuda_experts", CudaExperts(wgmma=opts.cuda_wgmma))] if cuda and opts.cuda_experts else []),
        ("fuse_transpose_matmul", rx.FuseTransposeMatmul()),
        ("legalize_ops", rx.LegalizeOps()),
        ("annotate_tir_op_pattern", rx.AnnotateTIROpPattern()),
        ("fold_constant", rx.FoldConstant()),
        ("fuse_ops", rx.FuseOps()),
        ("fuse_tir", rx.FuseTIR()),
        ("dead_code_elimination", rx.DeadCodeElimination()),
        ("schedule_tir", ScheduleTIR(opts.target, opts.extra_rules)),
    ]


def run_pipeline(mod, opts: PipelineOptions):
    t = compiler()
    if opts.dump_ir is not None:
        opts.dump_ir.mkdir(parents=True, exist_ok=True)
        (opts.dump_ir / "00_input.py").write_text(mod.script(show_meta=False))
    with opts.target, t.tvm.transform.PassContext(opt_level=3):
        for i, (name, p) in enumerate(phases(opts), start=1):
            if opts.on_phase:
                opts.on_phase(name)
            mod = p(mod)
            if opts.dump_ir is not None:
                (opts.dump_ir / f"{i:02d}_{name}.py").write_text(mod.script(show_meta=False))
    return mod
