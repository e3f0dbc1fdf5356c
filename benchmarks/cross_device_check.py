"""One model, two artifacts, two devices: a CUDA artifact against the CPU artifact
of the same checkpoint (which the test suite checks against transformers), on the
GPU machine through the bundle's runtime.

    python benchmarks/cross_device_check.py --pair REF.kiln:cpu ART.kiln:cuda [--pair ...] [--batch 8]

For each pair: max |logits - ref| / max |ref| over a teacher-forced prompt
(prefill) and over decode steps, and whether 32 greedy tokens are equal. With
--batch B, also B sequences decoded together by one decode_batch call per step
(the server's step) against the same sequences alone, when the artifact has it.
Prints one JSON line per pair.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def greedy_steps(s, prompts: list[list[int]], steps: int, together: bool) -> tuple[list[list[int]], np.ndarray]:
    """Greedy tokens of each prompt, decoded all in one decode_step per step (together) or one
    sequence at a time; and the last step's logits [B, V]."""
    seqs = [s.add_sequence() for _ in prompts]
    try:
        last = np.stack([s.prefill(q, p) for q, p in zip(seqs, prompts)]).reshape(len(prompts), -1)
        toks = [[int(np.argmax(row))] for row in last]
        for _ in range(steps - 1):
            cur = [t[-1] for t in toks]
            if together:
                lg = s.decode_step(seqs, cur)
            else:
                lg = np.concatenate([s.decode_step([q], [c]) for q, c in zip(seqs, cur)])
            last = lg.reshape(len(prompts), -1)
            for t, row in zip(toks, last):
                t.append(int(np.argmax(row)))
        return toks, last
    finally:
        for q in seqs:
            s.remove_sequence(q)


def forced_steps(s, prompts: list[list[int]], toks: list[list[int]], together: bool) -> np.ndarray:
    """Logits [steps, B, V] of each prompt followed by the given tokens (teacher-forced), decoded
    all in one decode_step per step (together) or one sequence at a time."""
    seqs = [s.add_sequence() for _ in prompts]
    try:
        for q, p in zip(seqs, prompts):
            s.prefill(q, p)
        out = []
        for step in range(len(toks[0]) - 1):
            cur = [t[step] for t in toks]
            if together:
                lg = s.decode_step(seqs, cur)
            else:
                lg = np.concatenate([s.decode_step([q], [c]) for q, c in zip(seqs, cur)])
            out.append(lg.reshape(len(prompts), -1))
        return np.stack(out)
    finally:
        for q in seqs:
            s.remove_sequence(q)


def batch_check(s, ids: list[int], batch: int) -> dict:
    """B sequences decoded together (decode_batch: the server's step) against each alone: free
    greedy runs (equal tokens expected at float32; in 16-bit the two paths sum in different orders,
    so a near-tie may pick another token and the runs part), and teacher-forced on the tokens of
    the runs alone (logits per step and argmax agreement: what a kernel error would show)."""
    prompts = [ids[i % 32:i % 32 + 5 + i % 3] + [i % len(ids)] for i in range(batch)]  # (any B: 40 ids)
    together, lt = greedy_steps(s, prompts, 16, True)
    alone, la = greedy_steps(s, prompts, 16, False)
    ft, fa = forced_steps(s, prompts, alone, True), forced_steps(s, prompts, alone, False)
    return {"batch": batch, "batch_tokens_equal": together == alone, "batch_last_rel": rel(lt, la),
            "batch_forced_rel": rel(ft, fa), "batch_forced_argmax_agree": float((ft.argmax(-1) == fa.argmax(-1)).mean())}


def check_pair(ref_spec: str, art_spec: str, batch: int) -> dict:
    from kiln.runtime import load  # noqa: PLC0415

    ref_path, ref_dev = ref_spec.rsplit(":", 1)
    art_path, art_dev = art_spec.rsplit(":", 1)
    ref, art = load(ref_path, device=ref_dev), load(art_path, device=art_dev, max_sequences=max(1, batch))
    ids = [int(i) for i in np.random.default_rng(0).integers(0, ref.vocab_size, 40)]
    pa, pr = art.logits(ids), ref.logits(ids)
    per_pos = [rel(x, y) for x, y in zip(pa.reshape(len(ids), -1), pr.reshape(len(ids), -1))]
    out = {"ref": ref_spec, "art": art_spec,
           "prefill_rel": rel(pa, pr),
           # a kernel error shows at every position; a routing flip (an MoE's bf16 rounding choosing
           # another expert) at a few: the median and the count of positions past 5% tell them apart
           "prefill_rel_median": float(np.median(per_pos)), "prefill_positions_over_5pct": int(sum(e > 0.05 for e in per_pos)),
           "decode_rel": rel(art.decode_logits(ids[:12]), ref.decode_logits(ids[:12]))}
    a = ref.generate(ids[:8], max_new_tokens=32, ignore_eos=True).tokens
    b = art.generate(ids[:8], max_new_tokens=32, ignore_eos=True).tokens
    out.update(greedy_equal=a == b, first_diff=next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None),
               distinct_tokens=len(set(a)))
    if batch > 1:
        out.update(batch_check(art, ids, batch))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("REF:DEVICE", "ART:DEVICE"))
    ap.add_argument("--batch", type=int, default=0)
    a = ap.parse_args()
    for ref, art in a.pair:
        t = time.perf_counter()
        try:
            res = check_pair(ref, art, a.batch)
        except Exception as err:  # noqa: BLE001  (report and go on to the next pair)
            res = {"ref": ref, "art": art, "error": f"{type(err).__name__}: {err}"}
        res["seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
