"""`kiln compile model.onnx`: an ONNX graph -> a "graph" artifact (issue 18).

read_onnx (frontends/onnx.py: bounded checks before and after parsing) ->
import_onnx (frontends/onnx_graph.py: folding, params, TVM's importer) ->
WrapGatherIndices, HoistShapeBindings -> kiln's pipeline (the same phases
and CPU schedules as the LLMs; dlight's rules where kiln's do not fit; then
passes/cpu_graph_rules.py's for what none of those takes) ->
codegen per target -> weights.safetensors -> manifest (kind "graph") ->
atomic publish with the same ArtifactWriter.

The library's `main(*inputs, *params)` is what the runtime calls
(runtime/graph.py); the manifest lists inputs and outputs with names, dtypes
and shapes (symbolic dimensions by name).
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import CompileError
from ..frontends.onnx import read_onnx
from ..frontends.onnx_graph import import_onnx, parse_input_shapes
from ..passes.activation_matmuls_on_gemm import ActivationMatmulsOnGemm
from ..passes.conv_as_gemm import ConvAsGemm
from ..passes.cpu_graph_rules import graph_rules
from ..passes.hoist_shape_bindings import HoistShapeBindings
from ..passes.pipeline import PipelineOptions, run_pipeline
from ..passes.schedule_tir import MatmulWithoutTensorCores
from ..passes.max_pool_on_kernel import MaxPoolOnKernel
from ..passes.softmax_on_kernel import SoftmaxOnKernel
from ..passes.kernels.qdot_cpu import qdot_supported
from ..passes.narrow_float_params import NarrowFloatParams
from ..passes.pack_graph_weights import PackGraphWeights
from ..passes.q8_prompts_on_float_gemm import Q8PromptsOnFloatGemm
from ..passes.quant import WEIGHT_FORMATS
from ..passes.quantize_graph_weights import QuantizeGraphWeights
from ..passes.fuse_gemm_epilogues import FuseGemmEpilogues
from ..passes.read_conv_patches_in_place import ReadConvPatchesInPlace
from ..passes.wrap_gather_indices import WrapGatherIndices
from ..runtime.manifest import FORMAT_VERSION, GRAPH_KIND, MAGIC, RUNTIME_ABI
from ..tvm_compat import compiler
from .artifact import ArtifactWriter
from .graph_quality import measure, quality_inputs
from .interrupt import interruptible
from .progress import QUIET, Progress
from .stages import build_library
from .target import parse_target
from .weights import write_safetensors


# A matmul of more rows than this (its fewest: symbols at 1) keeps float weights under --quant.
# Measured (2 threads, this znver2, no VNNI): one q8 GEMM alone is 1.1-1.6x faster than the fp32
# one at every shape tried (M 16-3136, K 64-2304), but ResNet-50 with every convolution in q8 ran
# 155 ms against fp32's 135 (the large-row convolutions: each call quantizes its im2col rows
# first, and bias / ReLU no longer fuse into an opaque kernel -- not profiled further); with this
# limit (layer3/4 and the FC in q8) 137 ms. BERT-base at 128 tokens: q8 on every projection.
QDOT_MAX_ROWS = 512

_UNKNOWN_SHAPE = ("; TVM could not derive an operator's output shape from the inputs' symbolic dims "
                  "(pinning the input shapes with --input-shape NAME=D1,D2,... may help)")


# input names of the KV cache in decoder exports: optimum's past_key_values.N.key / .value, older past.N / past_key_N
_KV_CACHE_INPUT = re.compile(r"^(past_key_values|past_key|past_value|past)([._][0-9]|$)")


@dataclass(frozen=True)
class GraphOptions:
    model: Path
    output: Path
    target: str = "llvm"
    input_shapes: tuple[str, ...] = ()  # NAME=1,3,224,224
    dump_ir: Path | None = None
    quant: str | None = None  # a weight format (passes/quant/formats/) for the matmul / Gemm / Conv weights; CPU targets
    max_error: float | None = None  # with quant: fail (nothing written) if an output's relative L2 error vs float is over this
    quality_inputs: Path | None = None  # with quant: inputs to measure on (.npz, names as in the graph); else random ones
    quality_check: bool = True  # with quant: measure the error (one more CPU build and two runs)
    no_weights: bool = False  # code and param spec only (speed runs with random weights where the weights do not travel)
    dtype: str | None = None  # float16: compute in fp16 (fp32 accumulation), float weights stored fp16; CUDA targets. None/float32: as the graph
    cpu_gemm: bool = True  # CPU targets: float matmul / Conv weights packed for kiln's C GEMM (False: TVM's GEMM schedule, for A/B)

    def __post_init__(self):
        if self.quant == "none":
            object.__setattr__(self, "quant", None)
        for name in ("model", "output", "dump_ir", "quality_inputs"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Path):
                object.__setattr__(self, name, Path(v))
        object.__setattr__(self, "input_shapes", tuple(self.input_shapes))

    def check(self) -> GraphOptions:
        """Checks that need neither TVM nor the model (the CLI runs them first)."""
        parse_input_shapes(self.input_shapes)
        if self.quant is not None and self.quant not in WEIGHT_FORMATS:
            raise CompileError(f"--quant {self.quant!r}: for .onnx graphs one of none, {', '.join(WEIGHT_FORMATS)}")
        if self.quant is None and (self.max_error is not None or self.quality_inputs is not None):
            raise CompileError("--max-error and --quality-inputs go with --quant")
        if self.max_error is not None and not (self.max_error > 0 and self.quality_check):
            raise CompileError(f"--max-error {self.max_error}: must be > 0, and the quality check on")
        if self.dtype not in (None, "float32", "float16"):
            raise CompileError(f"--dtype {self.dtype} for .onnx graphs: float32 (as the graph) or float16 (CUDA targets)")
        if self.dtype == "float16" and not all(p.strip().startswith(("cuda", "sm_")) for p in self.target.split(",")):
            raise CompileError(f"--dtype float16 for .onnx graphs: CUDA targets only (CPU graphs compute in float32), not {self.target}")
        if self.no_weights and self.quant is not None:
            raise CompileError("--no-weights and --quant: quantized graphs carry their weights (the quality gate measures them)")
        if self.quant is not None and "cuda" in self.target:
            raise CompileError(f"--quant {self.quant} for .onnx graphs: CPU targets (llvm...) only so far, not {self.target}")
        return self


@dataclass
class GraphSummary:
    output: Path
    num_params: int
    artifact_bytes: int
    targets: list[str]
    seconds: float
    inputs: list[str]
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"compiled {self.output}: ONNX graph, {self.num_params / 1e6:.2f}M params, inputs {', '.join(self.inputs)}, "
                f"{self.artifact_bytes / 2**20:.1f} MiB, target {', '.join(self.targets)}, {self.seconds:.1f} s"
                + "".join(f"\nwarning: {w}" for w in self.warnings))


def compile_onnx(model: str | Path, output: str | Path, *, progress: Progress = QUIET, **options) -> GraphSummary:
    """Compile an .onnx file into a graph artifact (options: GraphOptions' fields)."""
    return build_graph(GraphOptions(Path(model), Path(output), **options), progress)


def _fast_math(mod):
    """Relax's FastMathTransform, or the module as it is where that pass fails (TVM 0.27's reads
    `.name` of every function: an ExternFunc has none -- the backend suite's Expand cases)."""
    try:
        return compiler().relax.transform.FastMathTransform()(mod)
    except AttributeError:
        return mod


def _as_float16(p):
    """An Initializer read as float16 (the weights file stores what main takes)."""
    return replace(p, dtype="float16", load=lambda load=p.load: np.asarray(load(), dtype=np.float16))


@interruptible
def build_graph(opts: GraphOptions, progress: Progress = QUIET) -> GraphSummary:
    t0 = time.perf_counter()
    opts = opts.check()
    pinned = parse_input_shapes(opts.input_shapes)
    targets = parse_target(opts.target)
    progress(f"read {opts.model}")
    model = read_onnx(opts.model)
    progress(f"import (opset {model.opset}, {len(model.graph.node)} nodes)")
    graph = import_onnx(model, pinned)
    mod = HoistShapeBindings()(WrapGatherIndices()(graph.mod))
    cpu_only = sorted(str(gv.name_hint) for gv, f in mod.functions.items() if f.attrs is not None and "kiln.cpu_only" in f.attrs)
    if cpu_only and any(tg.kind != "llvm" for tg in targets):  # CPU loop nests (frontends/onnx_rnn.py): no GPU kernel for them
        raise CompileError(f"{opts.model}: {', '.join(cpu_only)} (kiln's RNN / GRU / LSTM kernels) run on CPU targets only; "
                           f"compile with --target llvm")
    if opts.dtype == "float16":  # fp16 activations and weights, fp32 accumulation in matmuls / convolutions; inputs and outputs keep their dtype
        try:
            mod = compiler().relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
        except Exception as err:  # noqa: BLE001 - TVM raises many types; one line
            msg = str(err).strip().splitlines()
            raise CompileError(f"{opts.model}: --dtype float16: Relax's ToMixedPrecision failed on this graph: "
                               f"{type(err).__name__}: {(msg[-1] if msg else '')[:200]}") from None
        mod, narrowed = NarrowFloatParams("float16")(mod, len(graph.inputs))
        graph = replace(graph, params=[_as_float16(p) if i in narrowed else p for i, p in enumerate(graph.params)])
    float_mod, graph_params = mod, graph.params
    params = [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "quant": "none"} for p in graph.params]
    fmt = WEIGHT_FORMATS[opts.quant] if opts.quant else None
    # CPU-only builds: kiln's C GEMM on weights packed into its panels once here (one weights file serves every target,
    # so a build that includes a GPU keeps the float layout and TVM's GEMM schedule on the CPU)
    pack = opts.cpu_gemm and all(tg.kind == "llvm" for tg in targets)
    if fmt is not None or pack:  # the convolutions go on the GEMM first, so their weights are matmuls'
        mod = float_mod = ConvAsGemm()(mod)
    if fmt is not None:  # CPU targets only (check())
        progress(f"quantize ({fmt.name})")
        # only matrices the integer-dot kernels take (on the dequantizing GEMM a quantized matrix is slower than a float
        # one), and only under few rows: see QDOT_MAX_ROWS
        takes = lambda k, group, rows: qdot_supported(fmt.name, k, group) and (rows is None or rows <= QDOT_MAX_ROWS)  # noqa: E731
        mod, graph_params, params = QuantizeGraphWeights(fmt, len(graph.inputs), takes)(float_mod, graph.params)
        if pack and not any("avx512vnni" in tg.llvm_features or "avxvnni" in tg.llvm_features for tg in targets):
            mod = Q8PromptsOnFloatGemm()(mod)  # many rows: q8 weights decoded into the float GEMM (no VNNI: faster)
    if pack:  # the float matrices left
        progress("pack float weights for the C GEMM")
        before = {e["name"]: e for e in params}
        mod, graph_params, packed = PackGraphWeights(len(graph.inputs))(mod, graph_params)
        params = [e if "layout" in e else before[e["name"]] for e in packed]
        mod = FuseGemmEpilogues()(ReadConvPatchesInPlace()(mod))  # convolutions: no im2col copy; bias / residual / ReLU in the store
        mod = SoftmaxOnKernel()(ActivationMatmulsOnGemm()(mod))  # the rest: products of two activations (attention); softmax rows
        mod = MaxPoolOnKernel()(mod)  # NHWC max pools (around the convolutions)
    inits = {p.name: p for p in graph_params}
    warnings = []
    cache = [i.name for i in graph.inputs if _KV_CACHE_INPUT.search(i.name)]
    if cache:  # an LLM exported with its KV cache as graph inputs (optimum / torch.onnx.export with use_cache)
        warnings.append(f"{opts.model.name}: {', '.join(cache[:2])}{' ...' if len(cache) > 2 else ''} look like a decoder's KV cache "
                        "passed in and out of the graph: the artifact runs it as exported (one call per step, the cache "
                        "copied through every call, no batching); for decoders compile the checkpoint instead "
                        "(`kiln compile` of its safetensors or GGUF) -- paged KV cache, quantized weights and KV, `kiln serve`")
    if fmt is not None and not any(p["quant"] == fmt.name for p in params):
        warnings.append(f"--quant {fmt.name}: no matmul / Gemm / Conv weight has rows the integer-dot kernels take "
                        "(K a multiple of 32, float32): the artifact's weights are all float")
    quality = None
    gate_inputs = quality_inputs(graph.inputs, opts.quality_inputs) if fmt and opts.quality_check else None  # bad files fail now
    with ArtifactWriter(opts.output) as writer:
        libraries = []
        for tg in targets:
            progress(f"passes ({tg.kind})")
            popts = PipelineOptions(target=tg.tvm_target(), dump_ir=Path(opts.dump_ir) / tg.device if opts.dump_ir else None,
                                    extra_rules=(tuple(graph_rules()) if tg.kind == "llvm"  # convolutions, pooling: else TVM's serial loops
                                                 else (MatmulWithoutTensorCores(),) if opts.dtype == "float16" else ()),
                                    on_phase=lambda n: progress(f"  pass {n}"))
            try:
                # CPU: convolutions on the GEMM; exp / erf / tanh / softmax as TOPI's vectorisable
                # approximations (libm's are scalar calls: BERT-base's GELU alone was 19 ms of 230)
                cpu = lambda m: _fast_math(m if fmt is not None or pack else ConvAsGemm()(m))  # noqa: E731
                lowered = run_pipeline(cpu(mod) if tg.kind == "llvm" else mod, popts)
                float_lowered = run_pipeline(cpu(float_mod), replace(popts, dump_ir=None, on_phase=None)) if fmt and opts.quality_check and quality is None else None
            except Exception as err:  # noqa: BLE001 - TVM raises many types; one line
                msg = str(err).strip().splitlines()
                raise CompileError(f"{opts.model}: kiln's passes failed for {tg.kind}: {type(err).__name__}: {(msg[-1] if msg else '')[:200]}"
                                   + (_UNKNOWN_SHAPE if "ShapeExpr shape" in str(err) else "")) from None
            rel = f"lib/{tg.device}.so"
            with progress.waiting(f"codegen ({tg.kind} {tg.label})"):
                try:
                    build_library(lowered, writer.path(rel), tg, cuda_graphs=False)
                except CompileError as err:
                    if "cannot emit this Relax operator" not in str(err.__cause__):
                        raise
                    raise CompileError(f"{opts.model}: {str(err)[str(err).rfind('failed: ') + 8:]} was left unlowered" + _UNKNOWN_SHAPE) from None
            writer.record(rel)
            if float_lowered is not None:
                with progress.waiting("quality gate (the float graph for this CPU, both run)"):
                    load = lambda ps: [np.asarray(p.load()) for p in ps]  # noqa: E731
                    quality = measure(float_lowered, tg, writer.path(rel), graph, load(graph.params), load(graph_params),
                                      gate_inputs, build_library)
                progress(f"  worst relative L2 error {quality['worst_rel_l2']:.3g} on {quality['inputs']}")
                if opts.max_error is not None and quality["worst_rel_l2"] > opts.max_error:
                    raise CompileError(f"{opts.model}: --quant {fmt.name}: relative L2 error {quality['worst_rel_l2']:.4g} is over "
                                       f"--max-error {opts.max_error} (on {quality['inputs']}); nothing written")
            libraries.append({**tg.manifest(), "library": rel, "compute_dtype": "as in the graph"})
        if not opts.no_weights:
            progress("write weights")
            info = write_safetensors(writer.open("weights.safetensors"), list(inits), {n: p.shape for n, p in inits.items()},
                                     {n: p.dtype for n, p in inits.items()}, lambda n: inits[n].load(),
                                     lambda done, total: progress.count("weights", done, total))
            writer.record("weights.safetensors", info)
        num_params = sum(p.size for p in graph.params)  # the float graph's count, quantized or not
        progress("write artifact")
        writer.commit({
            "magic": MAGIC,
            "format_version": FORMAT_VERSION,
            "kiln_version": __version__,
            "tvm_version": compiler().version,
            "runtime_abi": RUNTIME_ABI,
            "kind": GRAPH_KIND,
            "model": {
                "source": opts.model.name,
                "source_format": "onnx",
                "opset": model.opset,
                "producer": f"{model.proto.producer_name} {model.proto.producer_version}".strip(),
                "num_params": num_params,
                "nodes": len(model.graph.node),
                "folded_nodes": graph.folded,
                "ops": dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items())),
            },
            "dtype": ",".join(sorted({p["dtype"] for p in params})) or "none",
            "quant": ({"weights": fmt.name, "matrices": len({p["name"].rsplit(".", 1)[0] for p in params if p["quant"] == fmt.name}),
                       "quality": quality or "not measured"} if fmt else "none"),
            "graph": {"function": "main", "inputs": [i.manifest() for i in graph.inputs], "outputs": [o.manifest() for o in graph.outputs]},
            "targets": libraries,
            "params": params,
            "weights_file": None if opts.no_weights else "weights.safetensors",
        })
        total = sum(f["size"] for f in writer.files.values())
    return GraphSummary(opts.output, num_params, total, [f"{tg.kind}:{tg.label}" for tg in targets], time.perf_counter() - t0,
                        [f"{i.name}{list(i.shape)}" for i in graph.inputs], warnings)
