"""q4k: int4 codes per 32 weights with 8-bit scale and minimum codes under
fp16 super-block scales (the k-quant idea of llama.cpp's Q4_K, with 8-bit
instead of 6-bit sub-block codes):

    w = (d * sc) * q + (dm * mc)      q in [0, 15] per weight,
                                      sc uint8, mc int8 per 32 weights,
                                      d, dm fp16 per super-block of S weights

S is the largest multiple of 32 up to 256 that divides the row (256 for rows
of 1536 or 4096, 192 for SmolLM2's 576: llama.cpp's Q4_K needs 256 and falls
back to 5.5-bit Q5_0 on such rows). 4 + 16/32 + 32/S bits per weight: 4.625
at S = 256, 4.667 at 192 -- against q4g32's 5.0 with the same 32-weight
grid, and Q4_K_M's measured mix in BENCHMARKS.md.

Why: 4-bit quality is set by how many weights share a scale and minimum (a
row of 128 under one range: SmolLM2 KLD 0.27; 32: at Q4_K_M's level), and a
32-weight group's fp16 scale and minimum cost a whole bit per weight. The
scales of neighbouring groups are alike, so 8-bit codes under one fp16 pair
per super-block keep the 32-weight grid for half a bit.

Quantizing: each group's float (scale, minimum) by least squares as q4g32;
then d and dm from the super-block's largest, the codes rounded, and the
nine neighbouring (sc, mc) codes tried per group, keeping the one with the
smallest error (codes re-chosen for each). `importance` [K] (activation
energy per input column, from a calibration run) weights every error.
Parts: q uint32 [N, K/8] (codec.pack_nibbles), s uint8 [N, K/32], z int8
[N, K/32], d and m fp16 [N, K/S] (d and dm of each super-block: two arrays,
so a kernel reads each at one point, as the schedules' analyses expect).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..codec import pack_nibbles, tir_nibble, unpack_nibbles
from ..weights import WeightFormat

SUPER_MAX = 256


@dataclass(frozen=True)
class SuperBlockInt4(WeightFormat):
    def super_for(self, k: int) -> int:
        """The super-block of a row of k: the largest multiple of the group up to 256 dividing k."""
        g = self.group_for(k)
        return next(m * g for m in range(max(SUPER_MAX // g, 1), 0, -1) if k % (m * g) == 0)

    def parts(self, shape):
        n, k = shape
        g, sb = self.group_for(k), self.super_for(k)
        return {"q": ((n, k // 8), "uint32"), "s": ((n, k // g), "uint8"), "z": ((n, k // g), "int8"),
                "d": ((n, k // sb), "float16"), "m": ((n, k // sb), "float16")}

    def quantize(self, w, refine: int = 4, importance: np.ndarray | None = None):
        w = np.asarray(w, dtype=np.float32)
        n, k = w.shape
        g, sb = self.group_for(k), self.super_for(k)
        nb = sb // g
        imp = np.ones(k) if importance is None else np.asarray(importance, np.float64)
        if imp.shape != (k,) or not np.all(np.isfinite(imp)) or np.any(imp < 0):
            raise ValueError(f"importance: expected {k} finite non-negative values, got shape {imp.shape}")
        imp = imp / imp.mean() + 1e-3 if imp.mean() > 0 else np.ones(k)  # never a zero weight: every column still counts a little
        wg = w.reshape(n, k // sb, nb, g).astype(np.float64)
        ig = np.broadcast_to(imp.reshape(1, k // sb, nb, g), wg.shape)
        s, z = _fit_groups(wg, ig, refine)
        d = _f16(s.max(axis=-1, keepdims=True) / 255.0)
        dm = _f16(np.abs(z).max(axis=-1, keepdims=True) / 127.0)
        sc0 = np.clip(np.rint(s * _inv(d)), 0, 255)
        mc0 = np.clip(np.rint(z * _inv(dm)), -127, 127)
        best = None
        for ds in (0, -1, 1):
            for dz in (0, -1, 1):
                sc, mc = np.clip(sc0 + ds, 0, 255), np.clip(mc0 + dz, -127, 127)
                q, err = _codes(wg, sc * d, mc * dm, ig)
                if best is None:
                    best = [sc, mc, q, err]
                    continue
                better = err < best[3]
                best = [np.where(better, sc, best[0]), np.where(better, mc, best[1]),
                        np.where(better[..., None], q, best[2]), np.where(better, err, best[3])]
        sc, mc, q, _ = best
        return {"q": pack_nibbles(q.reshape(n, k).astype(np.uint8)), "s": sc.reshape(n, k // g).astype(np.uint8),
                "z": mc.reshape(n, k // g).astype(np.int8), "d": d.reshape(n, k // sb).astype(np.float16),
                "m": dm.reshape(n, k // sb).astype(np.float16)}

    def dequantize(self, parts, shape):
        n, k = shape
        g, sb = self.group_for(k), self.super_for(k)
        scale = np.repeat(parts["d"].astype(np.float32), sb // g, axis=1) * parts["s"].astype(np.float32)
        minimum = np.repeat(parts["m"].astype(np.float32), sb // g, axis=1) * parts["z"].astype(np.float32)
        codes = unpack_nibbles(parts["q"]).astype(np.float32)
        return codes * np.repeat(scale, g, axis=1) + np.repeat(minimum, g, axis=1)

    def te_weight(self, group, q, s, z=None, d=None, m=None):
        sb = int(q.shape[-1]) * 8 // int(d.shape[-1])

        def weight(n, k):
            scale = d[n, k // sb].astype("float32") * s[n, k // group].astype("float32")
            minimum = m[n, k // sb].astype("float32") * z[n, k // group].astype("float32")
            return tir_nibble(q, n, k).astype("float32") * scale + minimum

        return weight


def _f16(x):
    return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)


def _inv(x):
    return np.divide(1.0, x, out=np.zeros_like(x), where=x > 0)


def _codes(wg, s, z, imp):
    q = np.clip(np.rint((wg - z[..., None]) * _inv(s)[..., None]), 0, 15)
    return q, (imp * (wg - (q * s[..., None] + z[..., None])) ** 2).sum(axis=-1)


def _fit_groups(wg, imp, refine):
    """Float (scale, minimum) per group: [min, max] over 15 steps, then rounds of
    weighted least squares for the current codes, kept where the error fell."""
    z = wg.min(axis=-1)
    s = (wg.max(axis=-1) - z) / 15.0
    q, err = _codes(wg, s, z, imp)
    for _ in range(refine):
        a, b, c = (imp * q * q).sum(-1), (imp * q).sum(-1), imp.sum(-1)
        e, f = (imp * q * wg).sum(-1), (imp * wg).sum(-1)
        det = a * c - b * b
        ok = det > 1e-30
        s2 = np.where(ok, (c * e - b * f) / np.where(ok, det, 1), s)
        z2 = np.where(ok, (a * f - b * e) / np.where(ok, det, 1), z)
        s2 = np.maximum(s2, 0)
        q2, e2 = _codes(wg, s2, z2, imp)
        better = e2 < err
        s, z, err = np.where(better, s2, s), np.where(better, z2, z), np.where(better, e2, err)
        q = np.where(better[..., None], q2, q)
    return s, z


FORMATS = (SuperBlockInt4("q4k", bits=4, group=32, zero=True, cuda_code="4k", rank=1, weighs_importance=True),)
