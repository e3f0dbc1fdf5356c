"""`kiln compile`: checkpoint -> Relax IR -> passes -> codegen -> artifact."""

from __future__ import annotations

import contextlib
import functools
import math
import tempfile
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import CompileError
from ..frontends.config import ModelConfig
from ..frontends.models import family_for
from ..frontends.models.base import COMPUTE_DTYPE, Precision, check_finite
from ..frontends.readers import open_checkpoint
from ..passes.pipeline import PipelineOptions, run_pipeline
from ..passes.sort_shape_heap_stores import SortShapeHeapStores
from ..runtime.dtypes import itemsize
from ..runtime.manifest import FORMAT_VERSION, MAGIC, RUNTIME_ABI
from ..tvm_compat import compiler
from .artifact import ArtifactWriter
from .cuda_codegen import nvcc_callback
from ..passes.kernels.kv_cache import CpuPagedKVCache, CudaPagedKVCache
from ..passes.kernels.kv_quant import QuantKV
from .progress import QUIET, Progress
from .target import CompileTarget, parse_target
from ..passes.quant import QuantPlan, expand_params, kv_format
from .weights import write_safetensors

DTYPES = ("float32", "float16", "bfloat16")
PAGE_SIZE = 16
PAGE_SIZES = (16, 32, 64)


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


def _interruptible(fn):
    """Ctrl-C anywhere in a compile ends it as KeyboardInterrupt (`kiln: interrupted`,
    exit 130). TVM turns an interrupt that lands inside one of its calls (codegen,
    a Python pass called from C++) into an ordinary error, which would otherwise
    read as `codegen ... failed: RuntimeError`: a SIGINT seen while the compile ran
    wins over whatever error came out of it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)  # signal handlers belong to the main thread
        seen = threading.Event()
        prev = signal.getsignal(signal.SIGINT)
        saved_stderr = []

        def on_sigint(signum, frame):
            if prev == signal.SIG_IGN:
                return
            if not seen.is_set():
                # what TVM prints while its objects unwind ("BlockBuilder destroyed with
                # remaining blocks!") means nothing to someone who pressed Ctrl-C
                with contextlib.suppress(OSError):
                    sys.stderr.flush()
                    saved_stderr.append(os.dup(2))
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 2)
                    os.close(devnull)
            seen.set()
            if callable(prev):
                prev(signum, frame)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if seen.is_set():
                raise KeyboardInterrupt from err
            raise
        finally:
            signal.signal(signal.SIGINT, prev)
            for fd in saved_stderr:
                os.dup2(fd, 2)
                os.close(fd)

    return wrapper


@_interruptible
def compile_model(
    model: str | Path,
    output: str | Path,
    *,
    target: str = "llvm",
    dtype: str | None = None,
    max_seq_len: int | None = None,
    dump_ir: str | Path | None = None,
    no_weights: bool = False,
    page_size: int = PAGE_SIZE,
    quant: str | None = None,
    keep: list[str] | tuple[str, ...] = (),
    calib_text: str | Path | None = None,
    max_kld: float | None = None,
    quality_check: bool = True,
    kv_dtype: str | None = None,
    progress: Progress = QUIET,
) -> CompileSummary:
    """Compile a checkpoint (HF dir / .safetensors / .gguf) into an artifact directory.

    no_weights: `model` may be a config.json alone; the artifact carries code and
    the param spec but no weights (for speed runs with random weights on the
    target: `kiln bench --random-weights`)."""
    t0 = time.perf_counter()
    targets = parse_target(target)
    progress(f"read {model}")
    ck = open_checkpoint(model, weights=not no_weights)
    config = ModelConfig.from_dict(ck.config, file=f"{ck.source} (config)")
    family = family_for(config.architecture, file=ck.source)
    config = family.adapt_config(config)
    dtype = dtype or config.source_dtype
    if dtype not in DTYPES:
        raise CompileError(f"--dtype {dtype!r} is not supported; supported: {', '.join(DTYPES)}")
    max_ctx = config.max_position_embeddings
    if config.sliding_window is not None:
        max_ctx = min(max_ctx, config.sliding_window)  # attention stays exact within the window
    if max_seq_len is not None:
        if not 1 <= max_seq_len <= max_ctx:
            raise CompileError(f"--max-seq-len {max_seq_len} is outside [1, {max_ctx}] for this model")
        max_ctx = max_seq_len
    plan = QuantPlan.parse(quant, keep)
    all_cpu = all(tg.kind == "llvm" for tg in targets)
    kv_fmt = kv_format(kv_dtype, "float32" if all_cpu else dtype)
    if max_kld is not None and not (math.isfinite(max_kld) and max_kld > 0):
        raise CompileError(f"--max-kld {max_kld}: must be a positive number")
    if plan is None and kv_fmt is None and (calib_text is not None or max_kld is not None):
        raise CompileError("--calib-text / --max-kld measure a quantized model: they need --quant or --kv-dtype int8|fp8")
    if not quality_check and max_kld is not None:
        raise CompileError("--max-kld needs the quality check (drop --no-quality-check)")
    if page_size not in PAGE_SIZES:
        raise CompileError(f"--page-size {page_size} is not supported; supported: {', '.join(map(str, PAGE_SIZES))}")
    if dtype == "float16" and any(tg.kind == "cuda" for tg in targets):
        # TVM 0.27's dlight Matmul rule tensorizes fp16 matmuls and segfaults doing so
        # (seen on the Llama-3-8B shape): refuse rather than crash
        raise CompileError("--dtype float16 is not available for CUDA targets yet (TVM's fp16 tensorization crashes); use bfloat16 or float32")
    if len({tg.kind for tg in targets}) > 1 and dtype != "float32":
        # CPU keeps norms fp32 and computes in fp32; CUDA computes in the storage dtype: one
        # weights file cannot serve both yet
        raise CompileError(f"--target {target}: CPU and CUDA in one artifact need --dtype float32 for now (got {dtype})")
    if kv_fmt is not None and not kv_fmt.scaled and not all_cpu:
        raise CompileError(f"--kv-dtype {kv_dtype}: 16-bit float caches are for CPU targets; on CUDA the cache has the "
                           f"activations' dtype (--dtype {dtype}), or int8 / fp8")
    quality = None
    lossy = plan is not None or kv_fmt is not None
    what = " ".join(x for x in (f"--quant {quant}" if plan else "", f"--kv-dtype {kv_dtype}" if kv_fmt else "") if x)
    if lossy and not no_weights and quality_check and ck.tokenizer is None:
        if max_kld is not None:
            raise CompileError(f"{ck.source}: no tokenizer to read the calibration text with, so --max-kld cannot be checked")
        progress("quality check skipped: the model has no tokenizer to read the calibration text with")
    elif lossy and not no_weights and quality_check:
        quality = measure_quality(model, dtype=dtype, quant=quant, keep=keep, kv_dtype=kv_dtype if kv_fmt else None,
                                  calib_text=calib_text, progress=progress)
        progress(f"quality: mean KLD {quality['mean_kld']:.5f}, top-1 {100 * quality['top1_agreement']:.2f}%, "
                 f"perplexity {quality['perplexity']:.3f} (float {quality['ref_perplexity']:.3f})")
        if max_kld is not None and quality["mean_kld"] > max_kld:
            raise CompileError(f"{what}: mean KLD {quality['mean_kld']:.5f} over {quality['tokens']} tokens of "
                               f"{quality['text']} is over --max-kld {max_kld} (top-1 agreement {100 * quality['top1_agreement']:.2f}%); nothing written")
    thunks = None if no_weights else family.convert_hf(config, ck.tensor_names, ck.load, ck.source)
    expected = family.param_shapes(config)  # float params
    expanded = expand_params(expected, plan, tied=config.tie_word_embeddings)
    stored = {part: (base, spec) for base, e in expanded.items() for part, spec in e["parts"].items()}
    if plan is not None:
        unfit = [n for n, e in expanded.items() if e.get("kept_float")]
        if unfit:
            progress(f"kept float (rows of a length that is not a multiple of 8): {', '.join(unfit[:4])}{' ...' if len(unfit) > 4 else ''}")

    out_path = Path(output)
    with ArtifactWriter(out_path) as writer:
        progress("convert weights")
        tvm_targets = [tg.tvm_target() for tg in targets]
        # CPU computes in fp32 whatever the storage; CUDA computes in the storage dtype
        precisions = [Precision(dtype, COMPUTE_DTYPE if tg.kind == "llvm" else dtype, plan) for tg in targets]
        mods = []
        for tg, tvm_target, precision in zip(targets, tvm_targets, precisions):
            with tvm_target:  # the KV cache picks its kernels by the current target
                lm = family(config, precision, kv_cache_factory=functools.partial(CpuPagedKVCache if tg.kind == "llvm" else CudaPagedKVCache,
                                                                              kernel_page_size=page_size),
                            kv_quant=QuantKV(kv_fmt, page_size, tg.kind) if kv_fmt is not None else None)
                mod, named_params, _ = lm.export_tvm(spec=lm.export_spec(), allow_extern=True)
            mods.append(mod)
        order = [name for name, _ in named_params]
        param_dtypes = {name: str(p.dtype) for name, p in named_params}  # CPU: norms stay fp32
        if set(order) != set(stored):
            raise CompileError(f"internal: graph params and converted params differ: {sorted(set(order) ^ set(stored))[:5]}")
        packed: dict[str, dict] = {}  # the last quantized matrix's arrays (parts are written consecutively)
        imported = {"direct": 0, "requantized": 0}
        sources = family.hf_sources(config) if plan is not None else {}

        def produce(name: str) -> np.ndarray:
            base, _ = stored[name]
            fmt = expanded[base]["fmt"]
            if fmt is None:
                arr = thunks[base]()
                check_finite(base, arr, ck.source)
                return arr
            if base not in packed:
                packed.clear()
                direct = _direct_import(ck, sources.get(base, ()), fmt)
                if direct is not None:
                    imported["direct"] += 1
                    packed[base] = direct
                else:
                    arr = thunks[base]()
                    check_finite(base, arr, ck.source)
                    packed[base] = fmt.quantize(arr)
                    imported["requantized"] += 1
            return packed[base][name.rsplit(".", 1)[1]]

        shapes = {n: stored[n][1][0] for n in order}
        if not no_weights:
            info = write_safetensors(writer.open("weights.safetensors"), order, shapes, param_dtypes, produce,
                                     lambda done, total: progress.count("weights", done, total))
            writer.record("weights.safetensors", info)
            if plan is not None:
                progress(f"quantized matrices: {imported['direct']} taken from the file's own blocks as they are, "
                         f"{imported['requantized']} re-quantized from float")
        num_params = int(sum(int(np.prod(v)) for v in expected.values()))

        lib_entries = []
        for tg, tvm_target, mod, precision in zip(targets, tvm_targets, mods, precisions):
            progress(f"passes ({tg.kind})")
            # KILN_CUDA_GEMM=0: prefill GEMMs on dlight's Matmul instead of kiln's kernel;
            # KILN_CUDA_GEMV=1: decode on kiln's fused GEMVs (measured slower than dlight's
            # GEMV + separate norms on H100, benchmarks/NOTES.md: off by default);
            # KILN_CUDA_QGEMV=4,f8 (default) / 4,8,f8 / "": code kinds whose decode GEMVs run on kiln's
            # qgemv.cuh (4-bit: +8-11% over dlight on H100; 8-bit: on par or slower, so dlight)
            opts = PipelineOptions(target=tvm_target, cuda_gemm=os.environ.get("KILN_CUDA_GEMM") != "0",
                                   cuda_gemv=os.environ.get("KILN_CUDA_GEMV") == "1", cuda_qgemv=os.environ.get("KILN_CUDA_QGEMV", "4,f8"), dump_ir=Path(dump_ir) / tg.device if dump_ir else None, on_phase=lambda n: progress(f"  pass {n}"))
            lowered = run_pipeline(mod, opts)
            progress(f"codegen ({tg.kind} {tg.label})")
            rel = f"lib/{tg.device}.so"
            with progress.waiting(f"codegen ({tg.kind} {tg.label})"):
                _build_library(lowered, tvm_target, writer.path(rel), tg)
            writer.record(rel)
            lib_entries.append({**tg.manifest(), "library": rel, "compute_dtype": precision.compute})

        tok_manifest = None
        if ck.tokenizer is not None:
            tok = ck.tokenizer
            hw = writer.open("tokenizer.json")
            hw.write(tok.tokenizer_json.encode("utf-8"))
            writer.record("tokenizer.json", hw.close())
            tok_manifest = {
                "file": "tokenizer.json",
                "chat_template": tok.chat_template,
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "add_bos": tok.add_bos,
                "extra_eos_tokens": list(tok.extra_eos_tokens),
            }

        compute = precisions[0].compute
        # TVM's cache: K/V in the activations' dtype; kiln's quantized cache: codes + an fp32 scale per row
        row_bytes = kv_fmt.bytes_per_row(config.head_dim) if kv_fmt is not None else config.head_dim * itemsize(compute)
        manifest = {
            "magic": MAGIC,
            "format_version": FORMAT_VERSION,
            "kiln_version": __version__,
            "tvm_version": compiler().version,
            "runtime_abi": RUNTIME_ABI,
            "model": {
                "architecture": config.architecture,
                "config": json.loads(json.dumps(config.to_dict(), default=list)),
                "source": Path(ck.source).name,
                "source_format": ck.format,
                "source_dtypes": sorted(set(ck.tensor_dtypes.values())),
                "num_params": num_params,
            },
            "dtype": dtype,  # storage; each target entry says its compute dtype
            "quant": ({**plan.describe(), "quality": quality, "matrices": imported} if plan is not None else "none"),
            "kv_quant": ({"format": kv_fmt.name, "quality": quality if plan is None else "see quant.quality"} if kv_fmt is not None else "none"),
            "targets": lib_entries,
            "params": [_param_entry(n, shapes[n], param_dtypes[n], expanded[stored[n][0]]) for n in order],
            "weights_file": None if no_weights else "weights.safetensors",
            "kv_cache": {
                "kind": "paged" if kv_fmt is None else "kiln-quant",
                "dtype": compute if kv_fmt is None else kv_fmt.name,
                **({} if kv_fmt is None else {"code_dtype": kv_fmt.code_dtype, "scale_dtype": "float32"}),
                "page_size": page_size,
                "max_seq_len": max_ctx,
                "num_layers": config.num_hidden_layers,
                "num_kv_heads": config.num_key_value_heads,
                "head_dim": config.head_dim,
                "bytes_per_token": 2 * config.num_hidden_layers * config.num_key_value_heads * row_bytes,
            },
            "tokenizer": tok_manifest,
            "eos_token_ids": list(config.eos_token_ids),
            "bos_token_id": config.bos_token_id,
        }
        progress("write artifact")
        writer.commit(manifest)
        total = sum(f["size"] for f in writer.files.values())
    warnings = []
    if ck.tokenizer is None and not no_weights:
        warnings.append(f"{ck.source} has no tokenizer (tokenizer.json): the artifact takes token ids only "
                        f"(kiln run --tokens), not text prompts")
    return CompileSummary(out_path, num_params, total, [f"{tg.kind}:{tg.label}" for tg in targets], time.perf_counter() - t0, dtype,
                          warnings)


def _direct_import(ck, srcs, fmt) -> dict | None:
    """The kiln arrays of a param straight from the checkpoint's quantized blocks
    (GGUF Q4_1 -> q4g32, Q8_0 -> q8), concatenating rows like convert_hf; None
    unless every source tensor is exactly that format."""
    if ck.load_quantized is None or not srcs:
        return None
    parts = [ck.load_quantized(s, fmt.name) for s in srcs]
    if any(p is None for p in parts):
        return None
    return {k: np.concatenate([p[k] for p in parts], axis=0) if len(parts) > 1 else parts[0][k] for k in parts[0]}


BUILTIN_CALIB = Path(__file__).resolve().parent.parent / "passes" / "data" / "calib_en.txt"
MAX_CALIB_TOKENS = 8192
MAX_CALIB_BYTES = 16 * 2**20


def measure_quality(model, *, dtype: str, quant: str | None, keep, kv_dtype: str | None = None, calib_text=None, window: int = 512,
                    progress: Progress = QUIET) -> dict:
    """Compile the float32 model and the quantized one for this CPU into a
    scratch directory, run both over the text and compare (runtime/quality.py).
    CPU numerics (fp32 arithmetic): the quantization error itself, not a GPU's bf16."""
    from ..runtime import load  # noqa: PLC0415  (the full TVM is loaded here: the runtime uses it)
    from ..runtime.quality import compare_sessions  # noqa: PLC0415

    path = Path(calib_text) if calib_text is not None else BUILTIN_CALIB
    try:
        size = path.stat().st_size
        if size > MAX_CALIB_BYTES:  # only the first MAX_CALIB_TOKENS tokens are used: never read a huge file whole
            raise CompileError(f"--calib-text {path}: {size / 2**20:.0f} MiB; at most {MAX_CALIB_BYTES // 2**20} MiB "
                               f"(the first {MAX_CALIB_TOKENS} tokens are used)")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CompileError(f"--calib-text {path}: cannot read UTF-8 text ({err})") from None
    with tempfile.TemporaryDirectory(prefix="kiln-quality-") as tmp:
        what = " + ".join(x for x in (quant, f"{kv_dtype} KV" if kv_dtype else None) if x)
        progress(f"quality check: float32 and {what} for this CPU ({'built-in text' if calib_text is None else path})")
        inner = progress.live_only()  # the scratch compiles: live bars, no phase lines of their own
        progress("  quality check: compile float32")
        ref_dir = compile_model(model, Path(tmp) / "ref.kiln", target="llvm", dtype="float32", quality_check=False, progress=inner).output
        progress(f"  quality check: compile {what}")
        q_dir = compile_model(model, Path(tmp) / "q.kiln", target="llvm", dtype=dtype, quant=quant, keep=keep, kv_dtype=kv_dtype,
                              quality_check=False, progress=inner).output
        progress("  quality check: run both over the text")
        ref, test = load(ref_dir), load(q_dir)
        ids = ref.encode_prompt(text)[:MAX_CALIB_TOKENS]
        if len(ids) < 64:
            raise CompileError(f"--calib-text {path}: {len(ids)} tokens; at least 64 are needed")
        r = compare_sessions(test, ref, ids, window, on_window=lambda done, total: progress.count("quality windows", done, total))
    return {**r, "text": "built-in English text" if calib_text is None else path.name, "measured_on": "cpu, float32 arithmetic"}


def _param_entry(name: str, shape, dtype: str, e: dict) -> dict:
    if e["fmt"] is None:
        return {"name": name, "shape": list(shape), "dtype": dtype, "quant": "none"}
    entry = {"name": name, "shape": list(shape), "dtype": dtype, "quant": e["fmt"].name, "group": e["group"]}
    if name.endswith(".q") and e["fmt"].invalid_codes:  # byte values random weights must avoid (runtime/session.py)
        entry["invalid_codes"] = list(e["fmt"].invalid_codes)
    return entry


def _build_library(mod, tvm_target, path: Path, tg: CompileTarget) -> None:
    t = compiler()
    is_cuda = tg.kind == "cuda"
    # CUDA: device code compiled by nvcc at build time (kiln's callback: kiln's
    # kernel headers, SASS per arch + PTX), never source left for NVRTC
    hook = nvcc_callback(list(tg.archs)) if is_cuda else contextlib.nullcontext()
    cfg = {}
    if is_cuda:
        # capture static regions of each step into CUDA graphs (launch overhead);
        # KILN_NO_CUDA_GRAPH=1 for per-kernel profiling (benchmarks/profile_step.py)
        if os.environ.get("KILN_NO_CUDA_GRAPH") != "1":
            cfg["relax.backend.use_cuda_graph"] = True
        # TIR common-subexpression elimination breaks the llama3-scaled RoPE
        # kernels' codegen ("variable cse_v21 has been used before definition");
        # nvcc eliminates common subexpressions itself
        cfg["tirx.disable_cse_tir"] = True
    try:
        with hook, tvm_target, t.tvm.transform.PassContext(config=cfg):
            # SortShapeHeapStores: VMShapeLower's store order changes between runs (see that pass)
            pipeline = t.tvm.transform.Sequential([t.relax.pipeline.default_build_pipeline(), SortShapeHeapStores()])
            ex = t.relax.build(mod, target=tvm_target, relax_pipeline=pipeline)
        ex.export_library(str(path))
    except Exception as err:  # TVM raises many types; report one line
        raise CompileError(f"codegen for {tvm_target} failed: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}") from err


__all__ = ["compile_model", "CompileSummary", "CompileTarget"]
