"""`kiln compile`: checkpoint -> Relax IR -> passes -> codegen -> artifact.

The driver, in the order it runs: CompileOptions.check (options.py, no
TVM) -> read_model (the checkpoint once; what needs the model to decide) ->
the quality gate of a lossy compile (quality.py) -> the stages into the
artifact writer's staging directory (stages.py: graphs, weights, libraries,
tokenizer) -> the manifest (manifest.py) -> atomic publish (artifact.py)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import CompileError, UnsupportedModelError
from ..frontends.config import ModelConfig
from ..frontends.models import family_for
from ..frontends.models.layers import COMPUTE_DTYPE, Precision
from ..frontends.models.sharding import shard_config
from ..frontends.readers import open_checkpoint
from ..frontends.gguf_blocks import holding_format
from ..passes.quant import WEIGHT_FORMATS, KVFormat, QuantPlan, kv_format
from ..passes.quant.plan import SOURCE_MIX
from .artifact import ArtifactWriter
from .calibrate import collect_importance
from .interrupt import interruptible
from .manifest import make_manifest
from .options import DTYPES, PAGE_SIZE, PAGE_SIZES, CompileOptions, CudaOptions
from .progress import QUIET, Progress
from .quality import BUILTIN_CALIB, is_cpu_variant, quality_gate
from .stages import build_stages
from .target import CompileTarget, parse_target


@dataclass(frozen=True)
class Model:
    """What the driver read and resolved: the checkpoint, its config and family,
    and the settings that needed the model to decide."""

    ck: object  # frontends.checkpoint.Checkpoint
    config: ModelConfig
    family: type
    dtype: str  # storage
    max_ctx: int
    targets: tuple[CompileTarget, ...]
    plan: QuantPlan | None
    kv_dtype: str | None
    kv_fmt: KVFormat | None  # kiln's cache format; None: TVM's cache in the activations' dtype
    tp: int = 1  # tensor-parallel shards
    importance: dict | None = field(default=None, compare=False)  # --calibrate: param -> activation energy per input column
    emulate_fp8_act: bool = False  # the quality gate's CPU variant: round fp8 projections' inputs as Hopper's fp8 GEMMs do

    @property
    def windowed(self) -> bool:
        """Sliding-window layers run window-masked kernels (CPU, float KV cache, one shard);
        elsewhere the context is capped at the window."""
        return window_kernels(self.config, all(tg.kind == "llvm" for tg in self.targets), self.kv_fmt, self.tp)

    @property
    def graph_config(self) -> ModelConfig:
        """The config each shard's graph is built from (the model's own when tp = 1)."""
        return shard_config(self.config, self.tp)

    def precision(self, tg: CompileTarget) -> Precision:
        # CPU computes in fp32 whatever the storage; CUDA computes in the storage dtype
        return Precision(self.dtype, COMPUTE_DTYPE if tg.kind == "llvm" else self.dtype, self.plan)


@dataclass
class CompileSummary:
    output: Path
    num_params: int
    artifact_bytes: int
    targets: list[str]
    seconds: float
    dtype: str
    warnings: list[str] = field(default_factory=list)  # things the user should know about the artifact

    def line(self) -> str:
        return (f"compiled {self.output}: {self.num_params / 1e6:.1f}M params, {self.dtype}, "
                f"{self.artifact_bytes / 2**20:.1f} MiB, target {', '.join(self.targets)}, {self.seconds:.1f} s")


def compile_model(model: str | Path, output: str | Path, *, progress: Progress = QUIET, cuda: CudaOptions | None = None,
                  **options) -> CompileSummary:
    """Compile a checkpoint (HF dir / .safetensors / .gguf) into an artifact
    directory: the Python API over build(); options are CompileOptions' fields
    (no_weights: `model` may be a config.json alone; the artifact carries code
    and the param spec but no weights, for `kiln bench --random-weights`)."""
    return build(CompileOptions(Path(model), Path(output), cuda=cuda or CudaOptions(), **options), progress)


@interruptible
def build(opts: CompileOptions, progress: Progress = QUIET) -> CompileSummary:
    """The driver: check the options, read the model, run the stages, gate the
    quality of a lossy compile, write the manifest and publish atomically."""
    t0 = time.perf_counter()
    opts = replace(opts.check(), cuda=opts.cuda.with_env(),
                   cpu_intdot=os.environ.get("KILN_CPU_INTDOT", "1" if opts.cpu_intdot else "0") != "0")
    m = read_model(opts, progress)
    if opts.calibrate:
        m = replace(m, importance=collect_importance(m, opts, progress))
    gate = _gate_needed(m, opts, progress)
    reuse = gate and is_cpu_variant(m)  # the artifact is the gate's lossy CPU build: measure it where it is staged
    quality = quality_gate(m, opts, progress) if gate and not reuse else None
    with ArtifactWriter(opts.output) as writer:
        built = build_stages(m, writer, page_size=opts.page_size, no_weights=opts.no_weights, cuda=opts.cuda,
                             cpu_intdot=opts.cpu_intdot, dump_ir=opts.dump_ir, progress=progress)

        def manifest(q):
            return make_manifest(m, page_size=opts.page_size, no_weights=opts.no_weights, built=built, quality=q)

        if reuse:
            quality = quality_gate(m, opts, progress, staged=writer.seal(manifest(None)))
        progress("write artifact")
        writer.commit(manifest(quality))
        total = sum(f["size"] for f in writer.files.values())
    warnings = []
    c = m.config
    if c.sliding_window is not None and c.sliding_window < c.max_position_embeddings and opts.max_seq_len is None and not m.windowed:
        warnings.append(f"context capped at the sliding window, {c.sliding_window} of the model's {c.max_position_embeddings} tokens "
                        f"(kiln's windowed attention: CPU, float KV cache, one shard, some full-attention layers: docs/DESIGN.md, Gemma 3)")
    if m.ck.tokenizer is None and not opts.no_weights:
        warnings.append(f"{m.ck.source} has no tokenizer (tokenizer.json): the artifact takes token ids only "
                        f"(kiln run --tokens), not text prompts")
    return CompileSummary(opts.output, built.num_params, total, [f"{tg.kind}:{tg.label}" for tg in m.targets],
                          time.perf_counter() - t0, m.dtype, warnings)


def source_formats(ck, family, config) -> dict:
    """--quant gguf: param name -> the weight format its GGUF block types call for (holding_format)."""
    if ck.format != "gguf":
        raise CompileError(f"--quant {SOURCE_MIX} keeps a GGUF file's own block types; {ck.source} is a {ck.format} checkpoint: "
                           f"choose a format ({', '.join(WEIGHT_FORMATS)})")
    out = {}
    for name, srcs in family.hf_sources_for(config, set(ck.tensor_names)).items():
        fmt = holding_format({ck.tensor_dtypes[s] for s in srcs if s in ck.tensor_dtypes})
        out[name] = WEIGHT_FORMATS[fmt] if fmt is not None else None
    return out


def read_model(opts: CompileOptions, progress: Progress) -> Model:
    """Read the checkpoint and decide what needed the model (dtype, context, KV format)."""
    targets = tuple(parse_target(opts.target))
    progress(f"read {opts.model}")
    ck = open_checkpoint(opts.model, weights=not opts.no_weights)
    config = ModelConfig.from_dict(ck.config, file=f"{ck.source} (config)")
    family = family_for(config.architecture, file=ck.source)
    config = family.adapt_config(config)
    if (config.rope_scaling or {}).get("rope_type") == "yarn" and not family.yarn_rope:
        raise UnsupportedModelError(f"{ck.source}: YaRN RoPE scaling is supported for DeepSeek models only, not {config.architecture}")
    dtype = opts.dtype or config.source_dtype
    if dtype not in DTYPES:
        raise CompileError(f"--dtype {dtype!r} is not supported; supported: {', '.join(DTYPES)}")
    max_ctx = config.max_position_embeddings
    all_cpu = all(tg.kind == "llvm" for tg in targets)
    kv_fmt = kv_format(opts.kv_dtype, "float32" if all_cpu else dtype)
    capped = config.sliding_window is not None and config.sliding_window < max_ctx and not window_kernels(config, all_cpu, kv_fmt, opts.tensor_parallel)
    if capped:
        max_ctx = config.sliding_window  # attention stays exact within the window (docs/DESIGN.md, Gemma 3)
    if opts.max_seq_len is not None:
        if not 1 <= opts.max_seq_len <= max_ctx:
            why = (" (kiln caps the context at the model's sliding window where it has no windowed attention: "
                   "CUDA, --kv-dtype, --tensor-parallel, every layer sliding)") if capped else ""
            raise CompileError(f"--max-seq-len {opts.max_seq_len} is outside [1, {max_ctx}] for this model{why}")
        max_ctx = opts.max_seq_len
    plan = opts.plan
    if plan is not None and plan.weights == SOURCE_MIX:
        plan = plan.with_sources(source_formats(ck, family, config))
    if plan is None and kv_fmt is None and (opts.calib_text is not None or opts.max_kld is not None):
        raise CompileError("--calib-text / --max-kld measure a quantized model: they need --quant or --kv-dtype int8|fp8")
    if dtype == "float16" and not all_cpu:
        # TVM 0.27's dlight Matmul rule tensorizes fp16 matmuls and segfaults doing so
        # (seen on the Llama-3-8B shape): refuse rather than crash
        raise CompileError("--dtype float16 is not available for CUDA targets yet (TVM's fp16 tensorization crashes); use bfloat16 or float32")
    if len({tg.kind for tg in targets}) > 1 and dtype != "float32":
        # CPU keeps norms fp32 and computes in fp32; CUDA computes in the storage dtype: one
        # weights file cannot serve both yet
        raise CompileError(f"--target {opts.target}: CPU and CUDA in one artifact need --dtype float32 for now (got {dtype})")
    if kv_fmt is not None and not kv_fmt.scaled and not all_cpu:
        raise CompileError(f"--kv-dtype {opts.kv_dtype}: 16-bit float caches are for CPU targets; on CUDA the cache has the "
                           f"activations' dtype (--dtype {dtype}), or int8 / fp8")
    if family.latent_cache and not all_cpu and kv_fmt is not None:
        raise CompileError(f"--kv-dtype {opts.kv_dtype}: {config.architecture}'s latent KV cache is quantized on CPU targets only for now; "
                           f"on CUDA its rows have the activations' dtype")
    if family.latent_cache and opts.tensor_parallel > 1:
        raise CompileError(f"--tensor-parallel {opts.tensor_parallel}: {config.architecture}'s latent KV cache does not split over GPUs yet")
    m = Model(ck, config, family, dtype, max_ctx, targets, plan, opts.kv_dtype, kv_fmt, opts.tensor_parallel)
    m.graph_config  # an uneven split is refused here, before any work
    if m.tp > 1 and kv_fmt is not None:
        raise CompileError(f"--tensor-parallel {m.tp}: kiln's quantized KV cache (--kv-dtype {opts.kv_dtype}) does not split over GPUs yet")
    return m


def window_kernels(config: ModelConfig, all_cpu: bool, kv_fmt, tp: int) -> bool:
    """Whether sliding-window layers get window-masked kernels (else the context is capped at the
    window): CPU targets, a float KV cache, one shard, and at least one full-attention layer --
    TVM 0.27's cache allocates its prefill buffers only when some layer is plain MHA, so an
    every-layer-sliding model (Mistral) crashes there."""
    return (config.sliding_window is not None and all_cpu and kv_fmt is None and tp == 1
            and "full_attention" in config.layer_types)


def _gate_needed(m: Model, opts: CompileOptions, progress: Progress) -> bool:
    if (m.plan is None and m.kv_fmt is None) or opts.no_weights or not opts.quality_check:
        return False
    if m.ck.tokenizer is None:
        if opts.max_kld is not None:
            raise CompileError(f"{m.ck.source}: no tokenizer to read the calibration text with, so --max-kld cannot be checked")
        progress("quality check skipped: the model has no tokenizer to read the calibration text with")
        return False
    return True


__all__ = ["BUILTIN_CALIB", "PAGE_SIZE", "PAGE_SIZES", "CompileOptions", "CompileSummary", "CompileTarget", "CudaOptions",
           "build", "compile_model"]
