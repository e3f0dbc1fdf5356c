"""Token sampling on the host (numpy): greedy, temperature, top-k, top-p,
repetition penalty, seeded. Every field is range-checked."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import KilnError, RequestError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; HF semantics
    seed: int | None = None

    def __post_init__(self):
        def num(name, v, lo, hi, lo_open=False):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RequestError(f"{name} must be a finite number, got {v!r}")
            if v < lo or v > hi or (lo_open and v == lo):
                raise RequestError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")

        num("temperature", self.temperature, 0.0, 100.0)
        num("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        num("repetition_penalty", self.repetition_penalty, 0.0, 100.0, lo_open=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= 1 << 20:
            raise RequestError(f"top_k must be an integer in [0, 1048576], got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise RequestError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")


class NonFiniteLogitsError(KilnError):
    """The model produced NaN/Inf logits; the request fails instead of emitting garbage."""


class Sampler:
    def __init__(self, params: SamplingParams):
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling must be SamplingParams, got {type(params).__name__}")
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        # plain argmax: the device picks it (Session.decode_greedy), no logits copied back
        self.greedy = params.temperature == 0.0 and params.repetition_penalty == 1.0

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        """logits  # [vocab] float32 -> one token id."""
        if not np.isfinite(logits).all():
            raise NonFiniteLogitsError("the model produced NaN/Inf logits; refusing to sample")
        p = self.p
        x = logits.astype(np.float64, copy=True)
        if p.repetition_penalty != 1.0 and history:
            seen = np.unique(np.asarray(history, dtype=np.int64))
            vals = x[seen]
            x[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature == 0.0:
            return int(np.argmax(x))
        # Shift before scaling: (x - max) / T is <= 0 for any T > 0, so a tiny
        # temperature gives -inf (probability 0) instead of inf - inf = NaN.
        x -= x.max()
        with np.errstate(over="ignore"):
            x /= p.temperature
        if p.top_k and p.top_k < x.size:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x[x < kth] = -np.inf
        probs = np.exp(x)
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))
