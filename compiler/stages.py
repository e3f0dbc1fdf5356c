"""The stages of one build, each writing into an ArtifactWriter's staging
directory: the graphs (one per target), the weights (converted, quantized or
imported block for block), the libraries (passes + codegen) and the tokenizer.
The driver (build.py) runs them in order; the quality gate runs them for its
CPU variants of the same model."""

from __future__ import annotations

import contextlib
import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CompileError
from ..frontends.models.hf_names import check_finite
from ..frontends.models.sharding import layout, shard
from ..passes.kernels.gemm_cuda import ROWS_QCODES
from ..passes.kernels.kv_cache import CpuPagedKVCache, CudaPagedKVCache
from ..passes.kernels.kv_quant import QuantKV
from ..passes.kernels.mla import LatentKV, latent_format
from ..passes.pipeline import PipelineOptions, run_pipeline
from ..passes.quant import expand_params
from ..passes.sort_shape_heap_stores import SortShapeHeapStores
from ..tvm_compat import compiler
from .cpu_codegen import kernel_objects
from .cuda_codegen import nvcc_callback
from .ccl import build_ccl
from .options import CudaOptions
from .progress import Progress
from .shards import shard_file, sharding_of
from .target import CompileTarget, library_path, wgmma_ok
from .weights import write_safetensors


@dataclass
class Built:
    """What the stages produced, for the manifest."""

    params: list[dict]  # manifest param entries, in file order
    num_params: int  # float parameters of the model
    libraries: list[dict] = field(default_factory=list)  # manifest target entries
    imported: dict = field(default_factory=lambda: {"direct": 0, "requantized": 0})
    tokenizer: dict | None = None
    tensor_parallel: dict | None = None  # manifest `tensor_parallel` (shards > 1)


def build_stages(m, writer, *, page_size: int, no_weights: bool, cuda: CudaOptions, dump_ir: Path | None,
                 cpu_intdot: bool = True, observe: bool = False,
                 progress: Progress) -> Built:
    """m: the model and its resolved settings (build.Model; m.importance: float param name ->
    activation energy per input column, compiler/calibrate.py, for the formats whose quantizers
    weigh their error by it). Everything but the manifest. observe: a calibration build."""
    gc = m.graph_config  # a shard's (tensor parallel) or the whole model's
    expected = m.family.param_shapes(gc)  # float params
    expanded = expand_params(expected, m.plan, tied=gc.tie_word_embeddings)
    stored = {part: (base, spec) for base, e in expanded.items() for part, spec in e["parts"].items()}
    if m.plan is not None:
        unfit = [n for n, e in expanded.items() if e.get("kept_float")]
        if unfit:
            progress(f"kept float (rows of a length that is not a multiple of 8): {', '.join(unfit[:4])}{' ...' if len(unfit) > 4 else ''}")

    progress("convert weights")
    mods, named_params = export_graphs(m, page_size, cuda_decode_batch=cuda.decode_batch)
    order = [name for name, _ in named_params]
    param_dtypes = {name: str(p.dtype) for name, p in named_params}  # CPU: norms stay fp32
    if set(order) != set(stored):
        raise CompileError(f"internal: graph params and converted params differ: {sorted(set(order) ^ set(stored))[:5]}")
    shapes = {n: stored[n][1][0] for n in order}
    built = Built([_param_entry(n, shapes[n], param_dtypes[n], expanded[stored[n][0]]) for n in order],
                  int(sum(int(np.prod(v)) for v in m.family.param_shapes(m.config).values())))
    if m.tp > 1:
        files = None if no_weights else write_weights(m, writer, order, shapes, param_dtypes, stored, expanded, built.imported, progress)
        build_ccl(writer.path("lib/ccl.so"))
        writer.record("lib/ccl.so")
        built.tensor_parallel = {"size": m.tp, "ccl_library": "lib/ccl.so", "weights_files": files,
                                 "sharding": sharding_of(m, order, stored)}
    elif not no_weights:
        write_weights(m, writer, order, shapes, param_dtypes, stored, expanded, built.imported, progress)

    for tg, mod in zip(m.targets, mods):
        progress(f"passes ({tg.kind})")
        opts = PipelineOptions(target=tg.tvm_target(), cuda_gemm=cuda.gemm, cuda_gemv=cuda.gemv, cuda_qgemv=",".join(cuda.qgemv),
                               cuda_qgemv_mma=cuda.qgemv_mma, cuda_experts=cuda.experts, cuda_wgmma=cuda.wgmma and wgmma_ok(tg), cuda_fp8_act=cuda.fp8_act, cpu_intdot=cpu_intdot, observe=observe,
                               emulate_fp8_act=m.emulate_fp8_act,
                               dump_ir=Path(dump_ir) / tg.device if dump_ir else None, on_phase=lambda n: progress(f"  pass {n}"))
        lowered = run_pipeline(mod, opts)
        rel = library_path(tg, m.targets)
        progress(f"codegen ({tg.kind} {tg.label})")
        with progress.waiting(f"codegen ({tg.kind} {tg.label})"):
            build_library(lowered, writer.path(rel), tg, cuda_graphs=cuda.graphs)
        writer.record(rel)
        batch = any(gv.name_hint == "decode_batch" for gv in mod.get_global_vars())  # one call decodes several sequences
        built.libraries.append({**tg.manifest(), "library": rel, "compute_dtype": m.precision(tg).compute, "decode_batch": batch,
                                **({"int_dot": cpu_intdot} if tg.kind == "llvm" else {})})

    if m.ck.tokenizer is not None:
        tok = m.ck.tokenizer
        hw = writer.open("tokenizer.json")
        hw.write(tok.tokenizer_json.encode("utf-8"))
        writer.record("tokenizer.json", hw.close())
        built.tokenizer = {"file": "tokenizer.json", "chat_template": tok.chat_template, "bos_token": tok.bos_token,
                           "eos_token": tok.eos_token, "add_bos": tok.add_bos, "extra_eos_tokens": list(tok.extra_eos_tokens)}
    return built


def _cuda_decode_batch(option: bool | None, m, tg) -> bool:
    """CudaOptions.decode_batch, with None (auto) meaning: 16-bit activations and matrices
    that kiln_gemm_rows takes -- float, or quantized in a format with a row kernel
    (ROWS_QCODES: fp8, run end to end on the H200 on 2026-12-01: batched rows within bf16
    rounding of decoding alone, argmax equal). Other quantized formats and fp32 would fall
    to dlight's schedules; MoE expert matmuls have no row kernel yet."""
    if option is not None:
        return option
    if m.precision(tg).storage not in ("bfloat16", "float16") or m.config.num_experts:
        return False
    if m.plan is None:
        return True
    return all(f is None or f.cuda_code in ROWS_QCODES for role, f in m.plan.roles.items() if role != "embed")


def _kiln_cache(m, tg, page_size: int):
    """kiln's own cache of this build, or None (TVM's): the latent cache of an MLA model (in
    --kv-dtype's format, else the activations' dtype), or the quantized per-head cache."""
    if m.family.latent_cache:
        return LatentKV(latent_format(m.kv_fmt, m.precision(tg).compute), page_size, tg.kind)
    return QuantKV(m.kv_fmt, page_size, tg.kind) if m.kv_fmt is not None else None


def export_graphs(m, page_size: int, cuda_decode_batch: bool | None = None):
    """One Relax module per target (CPU computes in fp32 whatever the storage;
    CUDA in the storage dtype), and the named params (the same for every target)."""
    mods = []
    named_params = None
    for tg in m.targets:
        with tg.tvm_target():  # the KV cache picks its kernels by the current target
            kv_factory = functools.partial(CpuPagedKVCache if tg.kind == "llvm" else CudaPagedKVCache, kernel_page_size=page_size)
            lm = m.family(m.graph_config, m.precision(tg), kv_cache_factory=kv_factory, kv_quant=_kiln_cache(m, tg, page_size))
            lm.batch_decode = tg.kind == "llvm" or _cuda_decode_batch(cuda_decode_batch, m, tg)
            lm.window_kernels = m.windowed  # sliding-window layers get window-masked attention
            mod, named_params, _ = lm.export_tvm(spec=lm.export_spec(), allow_extern=True)
        mods.append(mod)
    return mods, named_params


def write_weights(m, writer, order, shapes, param_dtypes, stored, expanded, imported: dict, progress: Progress) -> list[str]:
    """The weights file, or one per tensor-parallel shard (each float param cut before it is
    quantized: compiler/shards.py); returns the files written, by shard. m.importance (unsplit
    models only: a shard's columns are not the whole model's) goes to the quantizers that take it."""
    thunks = m.family.convert_hf(m.config, m.ck.tensor_names, m.ck.load, m.ck.source)
    splits = layout(m.family, m.config, m.tp) if m.tp > 1 else None
    if splits is not None and "lm_head.weight" not in thunks:  # tied: each shard's head rows come from the table
        thunks["lm_head.weight"] = thunks["embed_tokens"]
    # the file's own quantized blocks are imported whole, so only into an unsplit model
    sources = m.family.hf_sources_for(m.config, set(m.ck.tensor_names)) if m.plan is not None and splits is None else {}
    for name in m.family.reordered_params(m.config):  # rows conversion moves: never imported block for block
        sources.pop(name, None)
    files = []
    for rank in range(m.tp):
        packed: dict[str, dict] = {}  # the last quantized matrix's arrays (parts are written consecutively)

        def weight(base: str, rank=rank) -> np.ndarray:
            arr = thunks[base]()
            check_finite(base, arr, m.ck.source)
            return arr if splits is None else shard(arr, splits[base], m.tp, rank)

        def produce(name: str, rank=rank, packed=packed, weight=weight) -> np.ndarray:
            base, _ = stored[name]
            fmt = expanded[base]["fmt"]
            if fmt is None:
                return weight(base)
            if base not in packed:
                packed.clear()
                direct = _direct_import(m.ck, sources.get(base, ()), fmt)
                if direct is not None:
                    packed[base] = direct
                else:
                    imp = (m.importance or {}).get(base) if splits is None and fmt.weighs_importance else None
                    packed[base] = fmt.quantize_stacked(weight(base), **({"importance": imp} if imp is not None else {}))  # [N, K] | [E, N, K]
                if rank == 0:
                    imported["direct" if direct is not None else "requantized"] += 1
            return packed[base][name.rsplit(".", 1)[1]]

        rel = "weights.safetensors" if splits is None else shard_file(rank)
        what = "weights" if splits is None else f"weights (shard {rank + 1} of {m.tp})"
        info = write_safetensors(writer.open(rel), order, shapes, param_dtypes, produce,
                                 lambda done, total, what=what: progress.count(what, done, total))
        writer.record(rel, info)
        files.append(rel)
    if m.plan is not None:
        progress(f"quantized matrices: {imported['direct']} taken from the file's own blocks as they are, "
                 f"{imported['requantized']} re-quantized from float")
    return files


def _direct_import(ck, srcs, fmt) -> dict | None:
    """The kiln arrays of a param straight from the checkpoint's quantized blocks
    (GGUF Q4_1 -> q4g32, Q8_0 -> q8), concatenating rows like convert_hf (within
    each expert for [E, N, K] stacks); None unless every source tensor is exactly that format."""
    if ck.load_quantized is None or not srcs:
        return None
    parts = [ck.load_quantized(s, fmt.name) for s in srcs]
    if any(p is None for p in parts):
        return None
    return {k: np.concatenate([p[k] for p in parts], axis=-2) if len(parts) > 1 else parts[0][k] for k in parts[0]}


def _param_entry(name: str, shape, dtype: str, e: dict) -> dict:
    if e["fmt"] is None:
        return {"name": name, "shape": list(shape), "dtype": dtype, "quant": "none"}
    entry = {"name": name, "shape": list(shape), "dtype": dtype, "quant": e["fmt"].name, "group": e["group"]}
    if name.endswith(".q") and e["fmt"].invalid_codes:  # byte values random weights must avoid (runtime/session.py)
        entry["invalid_codes"] = list(e["fmt"].invalid_codes)
    return entry


def build_library(mod, path: Path, tg: CompileTarget, cuda_graphs: bool = True) -> None:
    t = compiler()
    tvm_target = tg.tvm_target()
    is_cuda = tg.kind == "cuda"
    # CUDA: device code compiled by nvcc at build time (kiln's callback: kiln's
    # kernel headers, SASS per arch + PTX), never source left for NVRTC
    hook = nvcc_callback(list(tg.archs)) if is_cuda else contextlib.nullcontext()
    cfg = {}
    if is_cuda:
        if cuda_graphs:  # capture static regions of each step into CUDA graphs (launch overhead)
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
        # a library for another machine (llvm:aarch64 built on x86) is linked by its cross gcc;
        # a CPU library carries kiln's C kernels (compiled for tg's instruction sets)
        with tempfile.TemporaryDirectory(prefix="kiln-cc-") as tmp:
            addons = kernel_objects(tg, Path(tmp)) if not is_cuda else []
            ex.export_library(str(path), addons=addons, **({"cc": tg.linker} if tg.linker else {}))
    except Exception as err:  # TVM raises many types; report one line
        raise CompileError(f"codegen for {tvm_target} failed: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}") from err
