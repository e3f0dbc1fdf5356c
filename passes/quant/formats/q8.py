"""q8: int8, symmetric, one fp16 scale per 32 weights of a row: w = s * q,
q in [-127, 127]. 8.5 bits/weight (llama.cpp's Q8_0 layout of data; GGUF Q8_0
blocks import as they are)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..codec import round_f16
from ..weights import WeightFormat


@dataclass(frozen=True)
class SymmetricInt8(WeightFormat):
    def parts(self, shape):
        n, k = shape
        return {"q": ((n, k), "int8"), "s": ((n, k // self.group_for(k)), "float16")}

    def quantize(self, w, refine: int = 4):
        """Start from amax / 127, then `refine` rounds of least squares per group:
        codes for the current scale, then the scale that minimises the squared
        error for those codes, rounded to fp16 (the value the kernel multiplies
        by), kept only where the group's error went down."""
        w = np.asarray(w, dtype=np.float32)
        n, k = w.shape
        g = self.group_for(k)
        wg = w.reshape(n, k // g, g).astype(np.float64)
        s = round_f16(np.abs(wg).max(axis=2) / 127.0)
        q, err = _codes(wg, s)
        for _ in range(refine):
            qq = q.astype(np.float64)
            den = (qq * qq).sum(axis=2)
            s_new = round_f16(np.where(den > 0, (wg * qq).sum(axis=2) / np.maximum(den, 1e-30), s))
            q_new, err_new = _codes(wg, s_new)
            better = err_new < err
            s, err = np.where(better, s_new, s), np.where(better, err_new, err)
            q = np.where(better[..., None], q_new, q)
        return {"q": q.astype(np.int8).reshape(n, k), "s": s.astype(np.float16)}

    def dequantize(self, parts, shape):
        g = self.group_for(shape[1])
        return parts["q"].astype(np.float32) * np.repeat(parts["s"].astype(np.float32), g, axis=1)

    def te_weight(self, group, q, s, z=None):
        return lambda n, k: q[n, k].astype("float32") * s[n, k // group].astype("float32")


def _codes(wg, s):
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)[..., None]
    q = np.clip(np.rint(wg * inv), -127, 127)
    return q, ((wg - q * s[..., None]) ** 2).sum(axis=2)


FORMATS = (SymmetricInt8("q8", bits=8, group=32, cuda_code="8", rank=0),)
