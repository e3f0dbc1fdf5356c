"""The serving engine without HTTP: closed-loop waves of requests straight into runtime/engine.py's
Engine (the thread `kiln serve` runs), to tell the engine's own cost per step from the HTTP side's.

    python benchmarks/engine_load.py ARTIFACT [--device cuda --random-weights] [--concurrency 128]
        [--input 128] [--output 128] [--waves 3] [--max-seq-len 512]

Prints output tok/s and the mean time per decode step (all requests decoding) beside a bare
decode_greedy loop over the same number of sequences (benchmarks/batch_decode.py's measure).
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from kiln.runtime import load
from kiln.runtime.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--input", type=int, default=128)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens per step (the session's prefill_chunk)")
    ap.add_argument("--timing", action="store_true", help="also time the decode launch (host) and the wait for its tokens")
    a = ap.parse_args()
    c = a.concurrency
    s = load(a.artifact, device=a.device, random_weights=a.random_weights, max_sequences=c, max_seq_len=a.max_seq_len,
             prefill_chunk=a.prefill_chunk)
    rng = np.random.default_rng(0)
    clock = {"launch": 0.0, "wait": 0.0, "steps": 0}
    if a.timing:  # where a decode step's host time goes: queueing it, and waiting for its tokens
        launch = s.decode_greedy_async

        def timed_launch(seqs, toks):
            t0 = time.perf_counter()
            result = launch(seqs, toks)
            clock["launch"] += time.perf_counter() - t0
            clock["steps"] += len(seqs) == c

            def timed_result():
                t1 = time.perf_counter()
                out = result()
                clock["wait"] += time.perf_counter() - t1
                return out

            return timed_result

        s.decode_greedy_async = timed_launch
    engine = Engine(s).start()
    try:
        for wave in range(a.waves):
            done = threading.Semaphore(0)
            stamps: list[list[float]] = [[] for _ in range(c)]

            def on_event(ev, i):
                if ev.kind == "token":
                    stamps[i].append(time.perf_counter())
                elif ev.kind in ("done", "error"):
                    done.release()

            t0 = time.perf_counter()
            for i in range(c):
                prompt = [int(t) for t in rng.integers(0, s.vocab_size, a.input)]
                engine.submit(prompt, lambda ev, i=i: on_event(ev, i), max_new_tokens=a.output, ignore_eos=True)
            for _ in range(c):
                done.acquire()
            wall = time.perf_counter() - t0
            toks = sum(len(x) for x in stamps)
            gaps = np.concatenate([np.diff(x) for x in stamps if len(x) > 1])
            print(f"wave {wave}: {toks / wall:8.1f} output tok/s, wall {wall:.2f} s, ITL p50 {np.median(gaps) * 1e3:.2f} ms, "
                  f"first token after {min(x[0] for x in stamps) - t0:.3f}-{max(x[0] for x in stamps) - t0:.3f} s", flush=True)
    finally:
        engine.stop()
    if a.timing:
        print(f"engine: {clock['steps']} full steps; per decode call: launch {clock['launch'] / max(clock['steps'], 1) * 1e3:.2f} ms, "
              f"wait for tokens {clock['wait'] / max(clock['steps'], 1) * 1e3:.2f} ms (all calls / full steps)")
    # the bare step: the same number of sequences, one decode_greedy call per step
    seqs = [s.add_sequence() for _ in range(c)]
    for q in seqs:
        s.prefill(q, [int(t) for t in rng.integers(0, s.vocab_size, a.input)])
    toks = [1] * c
    for _ in range(3):
        toks = [int(t) for t in s.decode_greedy(seqs, toks)]
    clock.update(launch=0.0, wait=0.0, steps=0)
    t0 = time.perf_counter()
    for _ in range(32):
        toks = [int(t) for t in s.decode_greedy(seqs, toks)]
    print(f"bare decode_greedy, {c} sequences: {(time.perf_counter() - t0) / 32 * 1e3:.2f} ms/step")
    if a.timing:
        print(f"bare: launch {clock['launch'] / 32 * 1e3:.2f} ms, wait {clock['wait'] / 32 * 1e3:.2f} ms per step")


if __name__ == "__main__":
    main()
