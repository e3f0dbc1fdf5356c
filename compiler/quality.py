"""The quality gate of a lossy compile (--quant, --kv-dtype int8|fp8):
the float32 model and the lossy one, both built for this CPU, run over a
calibration text; mean KLD, top-1 agreement and perplexities go into the
manifest, and --max-kld fails the compile before anything is written.

CPU numerics (fp32 arithmetic): the quantization error itself, not a GPU's
bf16. The variants are built by the same stages as any artifact
(stages.build_stages), never by a recursive compile; the checkpoint is read
once; when the artifact being compiled *is* the lossy CPU variant (target
`llvm`), the gate measures it where it is staged instead of building it twice.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from ..errors import CompileError
from ..passes.quant import kv_format
from .artifact import ArtifactWriter
from .manifest import make_manifest
from .progress import Progress
from .stages import build_stages
from .target import parse_target, wgmma_ok

BUILTIN_CALIB = Path(__file__).resolve().parent.parent / "passes" / "data" / "calib_en.txt"
MAX_CALIB_TOKENS = 8192
MAX_CALIB_BYTES = 16 * 2**20
WINDOW = 512


def cpu_variant(m, *, lossy: bool, fp8_act: bool = False):
    """The model as the gate builds it: for this CPU, float32 (the reference) or
    the storage dtype with the plan and KV format of the compile (lossy); fp8_act: its fp8
    projections' inputs rounded to e4m3 per token, as a Hopper target's fp8 GEMMs round them."""
    host = tuple(parse_target("llvm"))
    # one process, whole graphs: a tensor-parallel artifact's shards are the whole model's
    # quantized matrices cut along groups, so the unsharded variant measures the same codes
    if not lossy:
        return replace(m, targets=host, dtype="float32", plan=None, kv_fmt=None, tp=1)
    return replace(m, targets=host, tp=1, kv_fmt=kv_format(m.kv_dtype, "float32") if m.kv_fmt is not None else None,
                   emulate_fp8_act=fp8_act)


def fp8_activations(m, opts) -> bool:
    """Whether the compile's GPU code rounds fp8 projections' inputs to e4m3 (fp8 weights on a Hopper target with
    wgmma: passes/kernels/gemm_cuda.py), so the gate must measure that rounding too."""
    return bool(m.plan is not None and "fp8" in (opts.quant or "") and opts.cuda.wgmma and opts.cuda.fp8_act
                and any(tg.kind == "cuda" and wgmma_ok(tg) for tg in m.targets))


def is_cpu_variant(m) -> bool:
    """Whether the artifact being compiled is the gate's lossy variant (reuse it)."""
    v = cpu_variant(m, lossy=True)
    return (m.targets, m.dtype, m.plan, m.kv_fmt, m.tp) == (v.targets, v.dtype, v.plan, v.kv_fmt, v.tp)


def read_calibration(calib_text: Path | None) -> str:
    path = calib_text if calib_text is not None else BUILTIN_CALIB
    try:
        size = path.stat().st_size
        if size > MAX_CALIB_BYTES:  # only the first MAX_CALIB_TOKENS tokens are used: never read a huge file whole
            raise CompileError(f"--calib-text {path}: {size / 2**20:.0f} MiB; at most {MAX_CALIB_BYTES // 2**20} MiB "
                               f"(the first {MAX_CALIB_TOKENS} tokens are used)")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CompileError(f"--calib-text {path}: cannot read UTF-8 text ({err})") from None


def quality_gate(m, opts, progress: Progress, staged: Path | None = None) -> dict:
    """Measure m's lossy CPU variant against the float32 one (staged: that
    variant, already built and sealed); raise if --max-kld is exceeded."""
    from ..runtime import load  # noqa: PLC0415  (the full TVM is loaded here: the runtime uses it)
    from ..runtime.quality import compare_sessions  # noqa: PLC0415

    text = read_calibration(opts.calib_text)
    act = fp8_activations(m, opts)
    what = " + ".join(x for x in (opts.quant if m.plan else None, "e4m3 activations (as on Hopper)" if act else None,
                                  f"{m.kv_dtype} KV" if m.kv_fmt else None) if x)
    where = "built-in text" if opts.calib_text is None else str(opts.calib_text)
    progress(f"quality check: float32 and {what} for this CPU ({where})")
    inner = progress.live_only()  # the scratch builds: live bars, no phase lines of their own
    with tempfile.TemporaryDirectory(prefix="kiln-quality-") as tmp:
        progress("  quality check: build float32")
        ref_dir = _scratch_build(cpu_variant(m, lossy=False), opts, Path(tmp) / "ref.kiln", inner)
        if staged is None:
            progress(f"  quality check: build {what}")
            staged = _scratch_build(cpu_variant(m, lossy=True, fp8_act=act), opts, Path(tmp) / "q.kiln", inner)
        progress("  quality check: run both over the text")
        ref, test = load(ref_dir), load(staged)
        ids = ref.encode_prompt(text)[:MAX_CALIB_TOKENS]
        if len(ids) < 64:
            raise CompileError(f"--calib-text {opts.calib_text}: {len(ids)} tokens; at least 64 are needed")
        window = min(WINDOW, ref.max_seq_len, test.max_seq_len)  # a model with a shorter context: windows of its context
        r = compare_sessions(test, ref, ids, window, on_window=lambda done, total: progress.count("quality windows", done, total))
        del ref, test
    quality = {**r, "text": "built-in English text" if opts.calib_text is None else opts.calib_text.name,
               "measured_on": "cpu, float32 arithmetic" + (", fp8 projection inputs rounded to e4m3 per token as on Hopper" if act else "")}
    progress(f"quality: mean KLD {quality['mean_kld']:.5f}, top-1 {100 * quality['top1_agreement']:.2f}%, "
             f"perplexity {quality['perplexity']:.3f} (float {quality['ref_perplexity']:.3f})")
    if opts.max_kld is not None and quality["mean_kld"] > opts.max_kld:
        flags = " ".join(x for x in (f"--quant {opts.quant}" if m.plan else "", f"--kv-dtype {m.kv_dtype}" if m.kv_fmt else "") if x)
        raise CompileError(f"{flags}: mean KLD {quality['mean_kld']:.5f} over {quality['tokens']} tokens of "
                           f"{quality['text']} is over --max-kld {opts.max_kld} (top-1 agreement {100 * quality['top1_agreement']:.2f}%); nothing written")
    return quality


def _scratch_build(mv, opts, path: Path, progress: Progress) -> Path:
    with ArtifactWriter(path) as w:
        built = build_stages(mv, w, page_size=opts.page_size, no_weights=False, cuda=opts.cuda, cpu_intdot=opts.cpu_intdot, dump_ir=None, progress=progress)
        w.commit(make_manifest(mv, page_size=opts.page_size, no_weights=False, built=built, quality=None))
    return path
