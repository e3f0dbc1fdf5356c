"""Greedy text of one artifact on two devices must be equal (issue 3: SmolLM2 at
fp32, the CPU library here and the CUDA library on the H100 through the bundle).

Each prompt runs through a kiln launcher (`kiln` here, `BUNDLE/kiln` there) as
a user would: `kiln run ART --device D --prompt P --chat --max-new-tokens N
--json`, greedy, EOS ignored so every prompt yields N tokens.

    here:   python benchmarks/text_equality.py --kiln kiln --artifact ART --device cpu -o ref.json
    there:  python3 benchmarks/text_equality.py --kiln "python3 BUNDLE/kiln" --artifact ART --device cuda -o gpu.json --compare ref.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a compiler does in two sentences.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
]


def run(kiln: str, art: str, device: str, prompt: str, n: int) -> dict:
    cmd = [*shlex.split(kiln), "run", art, "--device", device, "--prompt", prompt, "--chat", "--max-new-tokens", str(n), "--ignore-eos", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"prompt": prompt, "text": out["text"], "tokens": out.get("tokens")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default="kiln", help="launcher command")
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--device", choices=["cpu", "cuda"], required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--compare", default=None, help="reference JSON from another device")
    a = ap.parse_args()
    results = [run(a.kiln, a.artifact, a.device, p, a.max_new_tokens) for p in PROMPTS]
    with open(a.output, "w", encoding="utf-8") as f:
        json.dump({"device": a.device, "max_new_tokens": a.max_new_tokens, "results": results}, f, indent=1)
    if a.compare is None:
        for r in results:
            print(f"{r['prompt']!r} -> {r['text'][:70]!r}")
        return 0
    with open(a.compare, encoding="utf-8") as f:
        ref = {r["prompt"]: r for r in json.load(f)["results"]}
    same = 0
    for r in results:
        want = ref[r["prompt"]]
        ok = r["text"] == want["text"] and r["tokens"] == want["tokens"]
        same += ok
        print(f"{'EQUAL' if ok else 'DIFFERENT'} {r['prompt']!r}\n  {a.device}: {r['text']!r}")
        if not ok:
            print(f"  ref: {want['text']!r}")
    print(f"{same}/{len(results)} prompts: {a.device} greedy text equals the reference's")
    return 0 if same == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
