"""Decode speed of the same model with different KV caches, side by side.

    python benchmarks/kv_cache_speed.py ART [ART ...] [--device cpu|cuda] [--context 2048] [--rounds 3]

Each artifact is one `kiln compile` of the same model that differs only in
--kv-dtype (e.g. the default float cache, int8, fp8). Each measurement is one
`kiln bench` in its own process, rounds interleaved (every artifact sees the
same machine weather); the table shows medians and the ratio to the first
artifact. --random-weights is passed for artifacts compiled with --no-weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

KEYS = ("prefill_tok_per_s", "decode_tok_per_s", "context_decode_tok_per_s")


def bench(art: str, a) -> dict:
    random = json.loads((Path(art) / "manifest.json").read_text()).get("weights_file") is None
    cmd = [sys.executable, "-m", "kiln.cli", "bench", art, "--device", a.device, "--prompt-len", str(a.prompt_len),
           "--gen-len", str(a.gen_len), "--json", *(["--context", str(a.context)] if a.context else []),
           *(["--random-weights"] if random else []), *(["--threads", str(a.threads)] if a.threads else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--context", type=int, default=0, help="also decode after this many cached tokens")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    runs: dict[str, list[dict]] = {art: [] for art in a.artifacts}
    for r in range(a.rounds):
        for art in a.artifacts:
            runs[art].append(bench(art, a))
            print(f"round {r + 1}: {Path(art).name} {', '.join(f'{k} {runs[art][-1].get(k)}' for k in KEYS)}", file=sys.stderr, flush=True)
    med = {art: {k: statistics.median(x[k] for x in rs) if rs[0].get(k) is not None else None for k in KEYS} for art, rs in runs.items()}
    base = med[a.artifacts[0]]
    print(f"{'artifact':32s} {'kv':>10s} {'KiB/token':>10s} {'prefill':>9s} {'decode':>9s} {'@ctx':>9s}  ratios to the first")
    for art in a.artifacts:
        kv = json.loads((Path(art) / "manifest.json").read_text())["kv_cache"]
        m = med[art]
        ratios = " ".join(f"{m[k] / base[k]:.2f}x" if m[k] and base[k] else "-" for k in KEYS)
        cells = " ".join(f"{m[k]:9.1f}" if m[k] is not None else f"{'-':>9s}" for k in KEYS)
        print(f"{Path(art).name:32s} {kv['dtype']:>10s} {kv['bytes_per_token'] / 1024:10.1f} {cells}  {ratios}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"args": vars(a), "runs": runs, "median": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
