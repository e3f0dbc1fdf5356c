"""One model built for several CPU levels (x86-64-v3 = AVX2, x86-64-v4 / znver4 /
sapphirerapids = AVX-512), run side by side on one host: do they agree, and
which is faster, kernel by kernel?

    python benchmarks/cpu_isa.py A.kiln B.kiln ... [--threads 2] [--rounds 3] [--json out.json]

Artifacts the host cannot run (missing CPU flags) are listed and skipped.
Artifacts compiled with --no-weights run on random weights (the same seeded
values in each), so logits are comparable across builds. Per round, each
artifact decodes --gen tokens after a --prompt-token prompt (interleaved
rounds: machines are noisy); then one instrumented decode step per artifact
gives the time per kernel (benchmarks/profile_step.py's method).
Needs only the kiln runtime (runs from a `kiln bundle`'s site/ folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import numpy as np

from kiln.errors import KilnError
from kiln.runtime import SamplingParams, load


def kernel_times(s, steps: int = 10) -> dict[str, float]:
    """ms per decode step by compiled function (the VM's instrument hook)."""
    totals: dict[str, float] = defaultdict(float)
    started: dict[str, float] = {}

    def instrument(func, name, before, ret, *args):
        if before:
            started[name] = time.perf_counter()
        else:
            totals[name] += time.perf_counter() - started.pop(name, time.perf_counter())
        return 0

    # the steps profile_step.py takes
    seq = s.add_sequence()
    s.prefill(seq, [1, 2, 3, 4, 5, 6, 7, 8])
    s.set_instrument(instrument)
    try:
        for _ in range(steps):
            s.decode_greedy([seq], [5])
    finally:
        s.set_instrument(None)
        s.remove_sequence(seq)
    return {k: v / steps * 1e3 for k, v in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    sessions = {}
    for path in a.artifacts:
        try:
            s = load(path, threads=a.threads, max_seq_len=a.prompt + a.gen + 32,
                     random_weights=_no_weights(path))
        except KilnError as err:
            print(f"skip {path}: {err}")
            continue
        sessions[path] = s
    if not sessions:
        raise SystemExit("no artifact runs on this host")
    names = {p: s.artifact.manifest["targets"][0].get("mcpu", "?") + "/" + s.artifact.manifest["dtype"] for p, s in sessions.items()}

    ids = [(i * 7919 + 13) % next(iter(sessions.values())).vocab_size for i in range(a.prompt)]
    logits = {p: s.logits(ids) for p, s in sessions.items()}
    first = next(iter(logits))
    agree = {}
    for p, lg in logits.items():
        ref = logits[first]
        agree[names[p]] = {"max_abs_diff": float(np.abs(lg - ref).max()), "ref_max_abs": float(np.abs(ref).max()),
                           "top1_agree": float((lg.argmax(-1) == ref.argmax(-1)).mean()), "vs": names[first]}

    rates: dict[str, list[float]] = defaultdict(list)
    for _ in range(a.rounds):
        for p, s in sessions.items():
            res = s.generate(ids, max_new_tokens=a.gen, sampling=SamplingParams(temperature=0), ignore_eos=True)
            rates[names[p]].append(res.decode_tok_per_s)
    kernels = {names[p]: kernel_times(s) for p, s in sessions.items()}

    print(f"threads {a.threads}, prompt {a.prompt}, {a.gen} greedy tokens, {a.rounds} interleaved rounds")
    print(f"{'build':32s} {'decode tok/s (median, range)':32s} {'max|diff| vs ' + names[first]:>24s} top-1")
    for n, r in rates.items():
        g = agree[n]
        print(f"{n:32s} {statistics.median(r):8.1f} ({min(r):.1f}-{max(r):.1f}){'':13s} {g['max_abs_diff']:12.2e} / {g['ref_max_abs']:.2f} {g['top1_agree']:.3f}")
    all_k = sorted({k for t in kernels.values() for k in t}, key=lambda k: -max(t.get(k, 0) for t in kernels.values()))
    print("\nms per decode step by kernel (top 15)")
    print(f"{'kernel':44s}" + "".join(f"{n[:18]:>20s}" for n in kernels))
    for k in all_k[:15]:
        print(f"{k[:44]:44s}" + "".join(f"{kernels[n].get(k, 0):20.3f}" for n in kernels))
    print(f"{'total':44s}" + "".join(f"{sum(kernels[n].values()):20.3f}" for n in kernels))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "rates": rates, "agree": agree, "kernels_ms": kernels}, f, indent=1)


def _no_weights(path: str) -> bool:
    with open(f"{path}/manifest.json") as f:
        return json.load(f).get("weights_file") is None


if __name__ == "__main__":
    main()
