"""kiln beside llama.cpp (llama-bench) on a host the real weights cannot reach:
both on random weights of one model's shape, rounds interleaved.

    python benchmarks/cpu_peer_random.py --llama-bench BIN --gguf F32=smol-f32.gguf --gguf F16=smol-f16.gguf \
        --kiln F32=a.kiln --kiln F32=b.kiln --kiln F16=c.kiln [--threads 2] [--rounds 3] [--gen 128] [--json OUT]

kiln artifacts are `--no-weights` builds (random weights at load, the same
bytes per token as real ones); the GGUFs come from benchmarks/gguf_random.py.
Decode tok/s: kiln generates --gen tokens after an 8-token prompt (decode
rate after the first token); llama-bench `-p 0 -n GEN` (its tg test: GEN
tokens from an empty context). Each measurement runs in its own process.
Ratios are kiln / llama.cpp at the same format (median of rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

KILN_WORKER = """
import json, sys
from kiln.runtime import SamplingParams, load
path, threads, gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = load(path, threads=threads, random_weights=True, max_seq_len=gen + 64)
s.generate([1, 2, 3, 4], max_new_tokens=8, ignore_eos=True)  # warm-up
res = s.generate([5, 6, 7, 8, 9, 10, 11, 12], max_new_tokens=gen, sampling=SamplingParams(temperature=0), ignore_eos=True)
m = s.artifact.manifest["targets"][0]
print(json.dumps({"tok_s": res.decode_tok_per_s, "label": m.get("mcpu", "?") + "/" + s.artifact.manifest["dtype"]}))
"""


def kiln_rate(path: str, threads: int, gen: int) -> dict:
    out = subprocess.run([sys.executable, "-c", KILN_WORKER, path, str(threads), str(gen)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_rate(binary: str, gguf: str, threads: int, gen: int) -> dict:
    cmd = [binary, "-m", gguf, "-t", str(threads), "-p", "0", "-n", str(gen), "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    runs = json.loads(out.stdout)
    return {"tok_s": float(runs[0]["avg_ts"]), "cpu": runs[0].get("cpu_info", ""), "build": runs[0].get("build_commit", "")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--gguf", action="append", default=[], metavar="FMT=PATH")
    ap.add_argument("--kiln", action="append", default=[], metavar="FMT=PATH")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    ggufs = dict(x.split("=", 1) for x in a.gguf)
    kilns = [x.split("=", 1) for x in a.kiln]
    rates: dict[tuple[str, str], list[float]] = defaultdict(list)
    notes = {}
    for _ in range(a.rounds):
        for fmt in sorted({f for f, _ in kilns} | set(ggufs), reverse=True):
            for f, path in kilns:
                if f == fmt:
                    r = kiln_rate(path, a.threads, a.gen)
                    label = f"kiln {r.get('label', path)} [{Path(path).parent.name}]"
                    rates[(fmt, label)].append(r.get("tok_s", float("nan")))
                    if "error" in r:
                        notes[label] = r["error"]
            if fmt in ggufs:
                r = llama_rate(a.llama_bench, ggufs[fmt], a.threads, a.gen)
                rates[(fmt, "llama.cpp " + fmt)].append(r.get("tok_s", float("nan")))
                if "error" in r:
                    notes["llama.cpp " + fmt] = r["error"]
                elif "cpu" in r:
                    notes.setdefault("llama.cpp cpu", r["cpu"])
    print(f"threads {a.threads}, {a.gen} tokens generated, {a.rounds} interleaved rounds; decode tok/s median (range)")
    print(f"{'format':6s} {'peer':36s} {'tok/s':>8s} {'range':>15s} {'vs llama.cpp':>13s}")
    for (fmt, who), r in sorted(rates.items(), key=lambda kv: (kv[0][0], not kv[0][1].startswith("llama"), kv[0][1])):
        peer = rates.get((fmt, "llama.cpp " + fmt))
        ratio = statistics.median(r) / statistics.median(peer) if peer and not who.startswith("llama") else None
        print(f"{fmt:6s} {who:36s} {statistics.median(r):8.1f} {min(r):7.1f}-{max(r):<7.1f} {'' if ratio is None else f'{ratio:13.2f}'}")
    for k, v in notes.items():
        print(f"note: {k}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "gen": a.gen, "rates": {f"{k[0]} {k[1]}": v for k, v in rates.items()}, "notes": notes}, f, indent=1)


if __name__ == "__main__":
    main()
