"""Quantization quality, kiln beside llama.cpp, on the bundled SmolLM2 (issue 4).

Every model is judged against float32 logits of the same weights (the bundled
Q4_1 GGUF dequantized once: that *is* the float model here), over the same
token ids, in non-overlapping 512-token windows each started from an empty
cache (runtime/quality.py):

  kiln     `kiln compile GGUF --dtype float32 --quant FMT` for each format,
           against kiln's float32 artifact;
  llama.cpp  the F32 GGUF (benchmarks/peer_models.py) quantized by
           `llama_model_quantize` with llama.cpp's default mix for Q8_0 and
           Q4_0 (what `llama-quantize` makes), all-position logits from
           llama-cpp-python (`logits_all=True`), against llama.cpp's F32.

    python benchmarks/quant_quality.py [--text FILE] [--formats q8,q4g32,q4g128,q4k] [--llama Q8_0,Q4_0,Q4_K_M] [--json OUT]

Bits per weight are of the body (the transformer layers' projection matrices,
scales included; the embedding / LM head are listed apart), read from each
file: kiln's manifest params, llama.cpp's GGUF tensor sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_models import BENCH_CACHE, _file_key, _short_hash, bundled_gguf, llama_quantized, write_float_gguf  # noqa: E402

from kiln.runtime import load  # noqa: E402
from kiln.runtime.quality import compare_sessions  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_TEXT = HERE.parent / "passes" / "data" / "calib_en.txt"


def kiln_artifact(src: Path, quant: str | None) -> Path:
    out = BENCH_CACHE / f"quality-{_short_hash(_file_key(src), quant or 'f32', _kiln_key())}.kiln"
    if not out.exists():
        cmd = ["kiln", "compile", str(src), "-o", str(out), "--dtype", "float32", "--quiet", "--no-quality-check"]
        if quant:
            cmd += ["--quant", quant]
        env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}  # set by the runtime loaded here
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return out


_BODY = (".qkv_proj.", ".o_proj.", ".gate_up_proj.", ".down_proj.")
_GGUF_BODY = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")


def kiln_body_bpw(art: Path) -> float:
    """Stored bits per weight of the body matrices of a kiln artifact (codes and scales)."""
    params = json.loads((art / "manifest.json").read_text())["params"]
    bits = weights = 0
    for p in params:
        name = p["name"]
        if any(b in name for b in _BODY):
            bits += int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize * 8
            if name.endswith(".weight") or name.endswith(".q"):  # the float matrix, or the codes of a quantized one
                k = p["shape"][-1] * (8 if p["dtype"] == "uint32" else 1)
                weights += int(np.prod(p["shape"][:-1])) * k
    return bits / weights


def gguf_body_bpw(path: Path) -> tuple[float, dict]:
    """(bits per weight of the body tensors, {tensor type: share of body weights})."""
    from gguf import GGUFReader  # noqa: PLC0415

    bits = weights = 0
    types: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        if t.name.split(".", 2)[-1].startswith(_GGUF_BODY):
            bits += int(t.n_bytes) * 8
            weights += int(t.n_elements)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_elements)
    return bits / weights, {k: round(v / weights, 3) for k, v in types.items()}


def _kiln_key() -> str:
    from peer_models import kiln_source_hash  # noqa: PLC0415

    return kiln_source_hash()


class LlamaCppLogits:
    def __init__(self, path: Path, window: int):
        from llama_cpp import Llama  # noqa: PLC0415

        self.llm = Llama(model_path=str(path), n_ctx=window, n_batch=window, logits_all=True, n_threads=2, verbose=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--formats", default="q8,q4g32,q4g128,q4k")
    ap.add_argument("--llama", default="Q8_0,Q4_0,Q4_K_M")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    src = bundled_gguf()
    f32 = write_float_gguf(src, BENCH_CACHE / f"{_short_hash(_file_key(src))}-f32.gguf", "F32")
    ref_art = load(kiln_artifact(src, None), threads=2)
    ids = ref_art.encode_prompt(Path(a.text).read_text(encoding="utf-8"))
    print(f"text {a.text}: {len(ids)} tokens, windows of {a.window}")
    rows = []
    for q in [f for f in a.formats.split(",") if f]:
        t0 = time.perf_counter()
        art = kiln_artifact(src, q)
        r = compare_sessions(load(art, threads=2), ref_art, ids, a.window)
        rows.append({"who": "kiln", "format": q, "body_bpw": round(kiln_body_bpw(art), 3), **r, "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]))
    lref = LlamaCppLogits(f32, a.window)
    # the two float references agree (same weights, two engines)
    rows.append({"who": "llama.cpp F32 vs kiln f32", "format": "F32", **compare_sessions(lref, ref_art, ids, a.window)})
    print(json.dumps(rows[-1]))
    for ft in [f for f in a.llama.split(",") if f]:
        t0 = time.perf_counter()
        path = llama_quantized(f32, ft)
        bpw, types = gguf_body_bpw(path)
        r = compare_sessions(LlamaCppLogits(path, a.window), lref, ids, a.window)
        rows.append({"who": "llama.cpp", "format": ft, "body_bpw": round(bpw, 3), "body_types": types, **r,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]))
    print(f"\n| who | format | body bits/weight | mean KLD | top-1 agreement | perplexity (float {rows[0]['ref_perplexity']:.3f}) |\n|---|---|---|---|---|---|")
    for r in rows:
        bpw = f"{r['body_bpw']:.3f}" if "body_bpw" in r else "32"
        print(f"| {r['who']} | {r['format']} | {bpw} | {r['mean_kld']:.5f} | {100 * r['top1_agreement']:.2f}% | {r['perplexity']:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"text": a.text, "tokens": len(ids), "window": a.window, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
