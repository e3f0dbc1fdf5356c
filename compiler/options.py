"""What `kiln compile` was asked to do, validated once: the CLI, the Python API
(compile_model) and the quality gate all go through CompileOptions.

`check()` is pure (no TVM, no model read): the CLI calls it before importing
TVM, so a bad flag fails at once. Checks that need the model (max_seq_len
against its context, the default dtype) happen in the driver (build.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import CompileError
from ..passes.quant import QuantPlan, kv_format

DTYPES = ("float32", "float16", "bfloat16")
PAGE_SIZE = 16
PAGE_SIZES = (16, 32, 64)
QGEMV_KINDS = ("4", "4k", "8", "f8")


@dataclass(frozen=True)
class CudaOptions:
    """Which of kiln's CUDA kernels replace TVM's (benchmarks/NOTES.md has the measurements behind each default).

    gemm    prefill projections on kiln's tensor-core GEMM (else dlight's Matmul)
    gemv    decode on kiln's fused GEMVs (RMSNorm / residual folded in; measured
            slower than dlight's GEMV + separate norms on H100: off)
    qgemv   weight code kinds whose decode GEMVs run on kiln's qgemv.cuh
            ("4": +8-11% over dlight on H100; "8": on par or slower, so dlight)
    qgemv_mma  "4" under 16-bit activations on the tensor cores (qgemv.cuh qgemv_mma: 1.2-1.5x
            the float path's GEMV on the H200's large shapes) where K is in 128-weight steps
    experts mixture-of-experts layers on kiln's CUDA kernels (passes/cuda_experts.py:
            top-k + softmax in one warp per token, gate/up GEMV with SiLU * up,
            down GEMV with the routing weights and the sum over k; float stacks)
    graphs  capture static regions of each step into CUDA graphs (off only to
            profile kernels one by one: benchmarks/profile_step.py)
    decode_batch  export decode_batch (B sequences per call: the server's step) for
            CUDA too. None (auto): when the weights are 16-bit floats or fp8, whose
            [B, 1, K] projections run on kiln_gemm_rows; other quantized and fp32
            weights would get dlight's generic schedules, slower than one call per sequence
    wgmma   GEMMs of prompts and of decode_batch above 8 rows on Hopper's warpgroup MMA
            (kernels/cuda/gemm_wg.cuh) when every arch built is sm_90 (else the mma.sync kernels)
    fp8_act with wgmma, fp8 weights meet activations rounded to e4m3 per token on fp8 wgmma (twice the
            MMA rate, no widened codes; the quality gate measures the rounding); off: bf16
            activations and the codes widened to bf16 (slower prompts and batches, weight-only error)

    For experiments, environment variables override these in any compile:
    KILN_CUDA_GEMM=0|1, KILN_CUDA_GEMV=0|1, KILN_CUDA_QGEMV=4,4k,8,f8 (or empty), KILN_CUDA_QGEMV_MMA=0|1,
    KILN_NO_CUDA_GRAPH=1, KILN_CUDA_DECODE_BATCH=0|1, KILN_CUDA_EXPERTS=0|1, KILN_CUDA_WGMMA=0|1, KILN_CUDA_FP8_ACT=0|1."""

    gemm: bool = True
    gemv: bool = False
    qgemv: tuple[str, ...] = ("4", "4k", "f8")
    qgemv_mma: bool = True
    experts: bool = True
    graphs: bool = True
    decode_batch: bool | None = None
    wgmma: bool = True
    fp8_act: bool = True

    def with_env(self, env=os.environ) -> CudaOptions:
        out = self
        if env.get("KILN_CUDA_GEMM") in ("0", "1"):
            out = replace(out, gemm=env["KILN_CUDA_GEMM"] == "1")
        if env.get("KILN_CUDA_GEMV") in ("0", "1"):
            out = replace(out, gemv=env["KILN_CUDA_GEMV"] == "1")
        if "KILN_CUDA_QGEMV" in env:
            out = replace(out, qgemv=tuple(k for k in env["KILN_CUDA_QGEMV"].split(",") if k))
        if env.get("KILN_CUDA_QGEMV_MMA") in ("0", "1"):
            out = replace(out, qgemv_mma=env["KILN_CUDA_QGEMV_MMA"] == "1")
        if env.get("KILN_CUDA_EXPERTS") in ("0", "1"):
            out = replace(out, experts=env["KILN_CUDA_EXPERTS"] == "1")
        if env.get("KILN_NO_CUDA_GRAPH") == "1":
            out = replace(out, graphs=False)
        if env.get("KILN_CUDA_WGMMA") in ("0", "1"):
            out = replace(out, wgmma=env["KILN_CUDA_WGMMA"] == "1")
        if env.get("KILN_CUDA_FP8_ACT") in ("0", "1"):
            out = replace(out, fp8_act=env["KILN_CUDA_FP8_ACT"] == "1")
        if env.get("KILN_CUDA_DECODE_BATCH") in ("0", "1"):
            out = replace(out, decode_batch=env["KILN_CUDA_DECODE_BATCH"] == "1")
        return out

    def check(self) -> None:
        bad = [k for k in self.qgemv if k not in QGEMV_KINDS]
        if bad:
            raise CompileError(f"CUDA qgemv code kinds {bad}: supported {', '.join(QGEMV_KINDS)}")


@dataclass(frozen=True)
class CompileOptions:
    model: Path
    output: Path
    target: str = "llvm"
    dtype: str | None = None  # None: the checkpoint's own (torch_dtype / GGUF tensors)
    max_seq_len: int | None = None
    dump_ir: Path | None = None
    no_weights: bool = False  # `model` may be a config.json alone; code and param spec, no weights
    page_size: int = PAGE_SIZE
    quant: str | None = None
    keep: tuple[str, ...] = ()
    calib_text: Path | None = None
    max_kld: float | None = None
    quality_check: bool = True
    calibrate: bool = False  # weigh the quantizers' rounding by activation energy measured on the calibration text (compiler/calibrate.py)
    kv_dtype: str | None = None
    tensor_parallel: int = 1  # shards (GPUs) the model is split over (frontends/models/sharding.py)
    cpu_intdot: bool = True  # CPU quantized projections on integer dot products (KILN_CPU_INTDOT=0|1 overrides)
    cuda: CudaOptions = field(default_factory=CudaOptions)

    def __post_init__(self):
        for name in ("model", "output", "dump_ir", "calib_text"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Path):
                object.__setattr__(self, name, Path(v))
        object.__setattr__(self, "keep", tuple(self.keep))

    @property
    def plan(self) -> QuantPlan | None:
        return QuantPlan.parse(self.quant, self.keep)

    @property
    def cuda_targets(self) -> bool:
        return "cuda" in self.target

    def check(self) -> CompileOptions:
        """Every check that needs neither TVM nor the model; returns self."""
        if self.dtype is not None and self.dtype not in DTYPES:
            raise CompileError(f"--dtype {self.dtype!r} is not supported; supported: {', '.join(DTYPES)}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise CompileError(f"--max-seq-len {self.max_seq_len}: must be at least 1")
        if self.page_size not in PAGE_SIZES:
            raise CompileError(f"--page-size {self.page_size} is not supported; supported: {', '.join(map(str, PAGE_SIZES))}")
        plan = self.plan
        kv_fmt = kv_format(self.kv_dtype, "float32")  # the name; the dtype pairing is checked with the model's dtype
        if self.max_kld is not None and not (math.isfinite(self.max_kld) and self.max_kld > 0):
            raise CompileError(f"--max-kld {self.max_kld}: must be a positive number")
        if plan is None and kv_fmt is None and self.kv_dtype in (None, "float32") and (self.calib_text is not None or self.max_kld is not None):
            raise CompileError("--calib-text / --max-kld measure a quantized model: they need --quant or --kv-dtype int8|fp8")
        if self.calibrate and plan is None:
            raise CompileError("--calibrate weighs the quantization of weights: it needs --quant")
        if self.calibrate and self.no_weights:
            raise CompileError("--calibrate runs the model over text: not with --no-weights")
        if not self.quality_check and self.max_kld is not None:
            raise CompileError("--max-kld needs the quality check (drop --no-quality-check)")
        tp = self.tensor_parallel
        if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= 64:
            raise CompileError(f"--tensor-parallel {tp!r}: must be an integer in [1, 64]")
        self.cuda.check()
        return self
