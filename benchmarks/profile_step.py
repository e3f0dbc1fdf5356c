"""Where does one decode step (or one prefill) go? Times every call the Relax VM
makes, in situ (real weights, real KV cache), via the VM's instrument hook,
synchronising the device around each call. Kernel names are the compiled TIR
functions' names. (Artifacts built with CUDA graphs show the graph replay as
one call: compile with KILN_NO_CUDA_GRAPH=1 to see kernels.)

    python benchmarks/profile_step.py ART.kiln [--device cuda --random-weights] [--mode decode|prefill] [--context 128] [--batch B]

--batch B profiles the server's step: B sequences (advanced to --context cached
tokens without a prefill) decoded together by one decode_batch call per step.

With --ncu-range the timed steps run uninstrumented between cuProfilerStart and
cuProfilerStop, for Nsight Compute's exact per-kernel times:

    ncu --profile-from-start off --clock-control none --csv \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
        python benchmarks/profile_step.py ART --device cuda --random-weights --ncu-range --steps 1
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict


from kiln.runtime import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--mode", choices=["decode", "prefill"], default="decode")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--batch", type=int, default=1, help="decode B sequences per step through decode_batch")
    ap.add_argument("--ncu-range", action="store_true", help="no instrument hook; mark the timed steps for ncu --profile-from-start off")
    ap.add_argument("--host", action="store_true", help="no device syncs: each VM call's host time (launches are asynchronous, so a "
                                                        "call that waits for the device stands out)")
    a = ap.parse_args()
    s = load(a.artifact, device=a.device, threads=a.threads, verify=False, random_weights=a.random_weights,
             max_seq_len=a.context + a.steps + 8, max_sequences=max(a.batch, 1))
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    started: dict[str, float] = {}

    def instrument(func, name, before, ret, *args):
        if before:
            if not a.host:
                s.sync()  # GPU launches are asynchronous: time each call to completion
            started[name] = time.perf_counter()
        else:
            if not a.host:
                s.sync()
            totals[name] += time.perf_counter() - started.pop(name, time.perf_counter())
            counts[name] += 1
        return 0

    ids = [(i * 7919) % s.vocab_size for i in range(a.context)]

    if a.batch > 1:
        if a.mode != "decode":
            ap.error("--batch profiles decode steps only")
        seqs = [s.add_sequence() for _ in range(a.batch)]
        for q in seqs:
            s.advance(q, a.context)
        s.decode_greedy(seqs, [5] * a.batch)  # warm-up
    else:
        seqs = [s.add_sequence()]
        s.prefill(seqs[0], ids)
    seq = seqs[0]
    if a.ncu_range:
        import ctypes  # noqa: PLC0415

        cuda = ctypes.CDLL("libcuda.so.1")
        s.sync()
        cuda.cuProfilerStart()
    else:
        s.set_instrument(instrument)
    t0 = time.perf_counter()
    if a.mode == "decode":
        for _ in range(a.steps):
            s.decode_greedy(seqs, [5] * len(seqs))
    else:
        for _ in range(a.steps):
            s.remove_sequence(seq)
            seq = s.add_sequence()
            s.prefill(seq, ids)
    s.sync()
    wall = (time.perf_counter() - t0) / a.steps
    if a.ncu_range:
        cuda.cuProfilerStop()
        print(f"{a.mode} (batch {a.batch}): {wall * 1e3:.2f} ms per step (under ncu)")
        return
    inside = sum(totals.values()) / a.steps
    print(f"{a.mode} (batch {a.batch}): {wall * 1e3:.2f} ms per step (instrumented), {inside * 1e3:.2f} ms inside VM calls")
    for name, tot in sorted(totals.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {tot / a.steps * 1e3:8.3f} ms  {counts[name] // a.steps:4d} calls/step  {name}")


if __name__ == "__main__":
    main()
