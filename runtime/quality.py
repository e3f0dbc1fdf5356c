"""Quality of one model against a reference on the same text: mean KL
divergence KL(P_ref || P), top-1 agreement and both perplexities.

The text is cut into non-overlapping windows (512 tokens by default, the last
one shorter); each window is evaluated from an empty KV cache, teacher-forced,
so every position sees at most `window` tokens of context -- the convention
of llama.cpp's perplexity/KL tools, which the peers' numbers come from.
Used by `kiln eval --ref` and by the compiler's quantization gate.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_WINDOW = 512


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def windows(ids: list[int], window: int) -> list[list[int]]:
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    out = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= 2]


class Accumulator:
    """Sums over positions; windows are added one at a time (logits of a whole
    2,000-token text over a 128k vocabulary would not fit in memory)."""

    def __init__(self):
        self.n = 0
        self.kld = 0.0
        self.top1 = 0
        self.nll = 0.0
        self.nll_ref = 0.0
        self.kld_max = 0.0
        self.targets = 0

    def add(self, logits: np.ndarray, ref_logits: np.ndarray, ids: list[int]) -> None:
        """logits/ref_logits [T, vocab] for window tokens ids [T]; positions
        0..T-2 predict ids[1:] (the last position has no target but still has
        a distribution: it counts in KLD and top-1 too)."""
        lp, lq = log_softmax(ref_logits), log_softmax(logits)
        kld = (np.exp(lp) * (lp - lq)).sum(axis=-1)
        self.kld += float(kld.sum())
        self.kld_max = max(self.kld_max, float(kld.max()))
        self.top1 += int((ref_logits.argmax(axis=-1) == logits.argmax(axis=-1)).sum())
        self.n += len(ids)
        tgt = np.asarray(ids[1:])
        rows = np.arange(len(ids) - 1)
        self.nll += float(-lq[rows, tgt].sum())
        self.nll_ref += float(-lp[rows, tgt].sum())
        self.targets += len(ids) - 1

    def result(self) -> dict:
        t = max(self.targets, 1)
        return {
            "positions": self.n,
            "mean_kld": self.kld / max(self.n, 1),
            "max_kld": self.kld_max,
            "top1_agreement": self.top1 / max(self.n, 1),
            "perplexity": math.exp(self.nll / t),
            "ref_perplexity": math.exp(self.nll_ref / t),
        }


def compare_sessions(session, ref_session, ids: list[int], window: int = DEFAULT_WINDOW, on_window=None) -> dict:
    """`session` against `ref_session` over `ids` (token ids of the text). Either
    may be anything with `.logits(ids) -> [T, vocab]` (benchmarks pass llama.cpp).
    on_window(done, total) after each window."""
    acc = Accumulator()
    parts = list(windows(ids, window))
    for i, w in enumerate(parts):
        acc.add(session.logits(w), ref_session.logits(w), w)
        if on_window is not None:
            on_window(i + 1, len(parts))
    return {**acc.result(), "window": window, "tokens": len(ids)}
