"""Weight quantization: formats, the plan (`--quant`, `--keep`), and the numpy
codec that packs weights once, at compile time.

Formats (K = the reduction axis, the rows of W [N, K] stay rows):
  q8      int8, symmetric, one fp16 scale per 32 weights of a row: w = s * q,
          q in [-127, 127]. 8.5 bits/weight (llama.cpp's Q8_0 layout of data).
  q4g32   int4 with a minimum, fp16 scale and minimum per 32 weights:
  q4g128  w = s * q + m, q in [0, 15]; packed 8 per uint32, nibble j of word
          w holding element 8w + j. 5 / 4.25 bits/weight.
  fp8     e4m3 codes (uint8, the KV cache's codec in passes/kv_quant.py), one
          fp32 scale per row (output channel): w = s * e4m3(q). 8 bits/weight.
          Decoded with integer arithmetic on the float bits everywhere (the
          CPU has no fp8; on CUDA it is the same expression in the GEMV).
Why the 4-bit formats carry a minimum (zero point): a group's weights are
rarely centred, and a symmetric code wastes half a bit on the empty side;
with 128-wide groups the outliers set the range, and the minimum halves the
step for the common one-sided case. Measured against llama.cpp's symmetric
Q4_0 in BENCHMARKS.md.

A group must divide K: where the requested group does not (SmolLM2's hidden
576 with g128), the largest power of two <= the group that divides K is used
(576 -> 64) and the manifest records the group each param actually has. A
matrix whose K has no such group of 8 or more (K not a multiple of 8) stays
float, and the compiler says so (llama.cpp also falls back per tensor).

The plan assigns a format to each role: the body projections (qkv_proj,
o_proj, gate_up_proj, down_proj), the LM head and the embeddings. Default for
4-bit formats: LM head and embeddings at q8 -- the head is the most
sensitive matrix (llama.cpp keeps it at 6 bits in its Q4_0 mix), and a tied
head *is* the embedding table. `--keep ROLE=FMT` overrides (FMT: q8, q4g32,
q4g128, or `none` for the artifact's float dtype).

Nothing here imports TVM: the codec is plain numpy, used by the compiler
(packing), the tests and the quality tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import CompileError
from .kv_quant import KV_FORMATS, encode_rows, fp8_decode

ROLES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head", "embed")
BODY_ROLES = ROLES[:4]


@dataclass(frozen=True)
class QFormat:
    name: str
    bits: int
    group: int  # 0: one scale per row (per output channel)
    zero: bool  # asymmetric: a per-group minimum is stored
    float8: bool = False  # codes are e4m3 floats (passes/kv_quant.py's codec), not integers

    def _group(self, k: int) -> int | None:
        if self.group == 0:
            return k
        g = self.group
        while g >= 8 and k % g:
            g //= 2
        return g if g >= 8 and k % g == 0 else None

    def fits(self, k: int) -> bool:
        """Rows of k weights can be grouped (else the matrix stays float: see expand_params)."""
        return self._group(k) is not None

    def group_for(self, k: int) -> int:
        g = self._group(k)
        if g is None:
            raise CompileError(f"--quant {self.name}: a row of {k} weights cannot be split into groups of 8 or more")
        return g

    def parts(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], str]]:
        """Suffix -> (shape, dtype) of the stored arrays of a [N, K] matrix."""
        n, k = shape
        g = self.group_for(k)
        if self.float8:  # e4m3 codes, one fp32 scale per row
            return {"q": ((n, k), "uint8"), "s": ((n, 1), "float32")}
        q = ((n, k), "int8") if self.bits == 8 else ((n, k // 8), "uint32")
        out = {"q": q, "s": ((n, k // g), "float16")}
        if self.zero:
            out["z"] = ((n, k // g), "float16")
        return out


FORMATS = {
    "q8": QFormat("q8", 8, 32, False),
    "q4g32": QFormat("q4g32", 4, 32, True),
    "q4g128": QFormat("q4g128", 4, 128, True),
    "fp8": QFormat("fp8", 8, 0, False, float8=True),
}


def quantize(w: np.ndarray, fmt: QFormat, refine: int = 4) -> dict[str, np.ndarray]:
    """[N, K] float -> the stored arrays (see QFormat.parts).

    Start from the range (amax / 127 for q8; [min, max] over 15 steps for q4),
    then `refine` rounds of alternating least squares per group: codes for the
    current scale (and minimum), then the scale (and minimum) that minimise
    the squared error for those codes, rounded to fp16 -- the values the
    kernel will multiply by -- keeping a group's new parameters only where its
    error went down. Codes are always chosen for the rounded parameters."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    if fmt.float8:
        return _quantize_fp8(w)
    g = fmt.group_for(k)
    wg = w.reshape(n, k // g, g).astype(np.float64)
    if fmt.bits == 8:
        s = _f16((np.abs(wg).max(axis=2) / 127.0))
        q, err = _codes_sym(wg, s)
        for _ in range(refine):
            qq = q.astype(np.float64)
            den = (qq * qq).sum(axis=2)
            s_new = _f16(np.where(den > 0, (wg * qq).sum(axis=2) / np.maximum(den, 1e-30), s))
            q_new, err_new = _codes_sym(wg, s_new)
            better = err_new < err
            s, err = np.where(better, s_new, s), np.where(better, err_new, err)
            q = np.where(better[..., None], q_new, q)
        return {"q": q.astype(np.int8).reshape(n, k), "s": s.astype(np.float16)}
    lo, hi = wg.min(axis=2), wg.max(axis=2)
    z = _f16(lo)
    s = _f16((hi - z) / 15.0)
    q, err = _codes_asym(wg, s, z)
    for _ in range(refine):
        qq = q.astype(np.float64)
        # least squares for w ~ s q + z over the group (2x2 normal equations)
        sq, sqq, sw, sqw = qq.sum(axis=2), (qq * qq).sum(axis=2), wg.sum(axis=2), (qq * wg).sum(axis=2)
        det = g * sqq - sq * sq
        ok = det > 0
        s_new = _f16(np.where(ok, (g * sqw - sq * sw) / np.where(ok, det, 1), s))
        z_new = _f16(np.where(ok, (sw - s_new.astype(np.float64) * sq) / g, z))
        q_new, err_new = _codes_asym(wg, s_new, z_new)
        better = err_new < err
        s, z, err = np.where(better, s_new, s), np.where(better, z_new, z), np.where(better, err_new, err)
        q = np.where(better[..., None], q_new, q)
    codes = q.astype(np.uint32).reshape(n, k // 8, 8)
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    packed = np.bitwise_or.reduce(codes << shifts, axis=2).astype(np.uint32)
    return {"q": packed, "s": s.astype(np.float16), "z": z.astype(np.float16)}


def _quantize_fp8(w: np.ndarray) -> dict[str, np.ndarray]:
    """e4m3 codes with one fp32 scale per row: the KV cache's row codec
    (passes/kv_quant.py; the row maximum maps to 448, each weight rounds to the
    nearest e4m3 value). A floating grid keeps 3 mantissa bits at every
    magnitude, so searching for a better scale helps little."""
    codes, scales = encode_rows(w, KV_FORMATS["fp8"])
    return {"q": codes, "s": scales[:, None]}


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to fp16 (the stored precision), back in float64 for the arithmetic."""
    return np.asarray(x, dtype=np.float64).astype(np.float16).astype(np.float64)


def _codes_sym(wg, s):
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)[..., None]
    q = np.clip(np.rint(wg * inv), -127, 127)
    return q, ((wg - q * s[..., None]) ** 2).sum(axis=2)


def _codes_asym(wg, s, z):
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)[..., None]
    q = np.clip(np.rint((wg - z[..., None]) * inv), 0, 15)
    return q, ((wg - (q * s[..., None] + z[..., None])) ** 2).sum(axis=2)


def dequantize(parts: dict[str, np.ndarray], fmt: QFormat, shape: tuple[int, int]) -> np.ndarray:
    """The float matrix the kernels compute with (reference for tests and tools)."""
    n, k = shape
    g = fmt.group_for(k)
    s = np.repeat(parts["s"].astype(np.float32), g, axis=1)
    if fmt.float8:
        return fp8_decode(parts["q"]) * s
    if fmt.bits == 8:
        return parts["q"].astype(np.float32) * s
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    codes = ((parts["q"][..., None] >> shifts) & 15).reshape(n, k).astype(np.float32)
    return codes * s + np.repeat(parts["z"].astype(np.float32), g, axis=1)


@dataclass(frozen=True)
class QuantPlan:
    """Which format each role gets (None = the artifact's float dtype)."""

    weights: str
    roles: dict = field(default_factory=dict)  # role -> QFormat | None

    @classmethod
    def parse(cls, quant: str | None, keep: list[str] | tuple[str, ...] = ()) -> QuantPlan | None:
        if quant in (None, "none"):
            if keep:
                raise CompileError("--keep needs --quant")
            return None
        if quant not in FORMATS:
            raise CompileError(f"--quant {quant!r} is not supported; supported: none, {', '.join(FORMATS)}")
        body = FORMATS[quant]
        head = FORMATS["q8"] if body.bits < 8 else body
        roles = {r: body for r in BODY_ROLES} | {"lm_head": head, "embed": head}
        for item in keep:
            role, sep, fmt = str(item).partition("=")
            if not sep or role not in ROLES:
                raise CompileError(f"--keep {item!r}: expected ROLE=FORMAT with ROLE one of {', '.join(ROLES)}")
            if fmt != "none" and fmt not in FORMATS:
                raise CompileError(f"--keep {item!r}: FORMAT must be none or one of {', '.join(FORMATS)}")
            roles[role] = None if fmt == "none" else FORMATS[fmt]
        return cls(quant, roles)

    def format_for(self, role: str, tied: bool = False) -> QFormat | None:
        # a tied LM head is the embedding table: one matrix, the head's format
        return self.roles["lm_head" if (tied and role == "embed") else role]

    def matrix_format(self, role: str, k: int, tied: bool = False) -> QFormat | None:
        """The format a matrix of this role with rows of k weights is stored in
        (None: float, by the plan or because its rows cannot be grouped)."""
        fmt = self.format_for(role, tied)
        return fmt if fmt is not None and fmt.fits(k) else None

    def describe(self) -> dict:
        return {"weights": self.weights, "roles": {r: (f.name if f else "none") for r, f in self.roles.items()}}


def role_of(name: str) -> str | None:
    """The plan role of a float param name, or None if it is never quantized."""
    if name == "embed_tokens":
        return "embed"
    if name == "lm_head.weight":
        return "lm_head"
    for r in BODY_ROLES:
        if name.endswith(f".{r}.weight"):
            return r
    return None


def expand_params(shapes: dict[str, tuple[int, ...]], plan: QuantPlan | None, tied: bool) -> dict[str, dict]:
    """Float param name -> {stored name: (shape, dtype)} plus its format.

    Stored names: `X.weight` -> `X.weight.q`, `X.weight.s` (, `X.weight.z`);
    `embed_tokens` -> `embed_tokens.q`, ... Unquantized params map to themselves
    with dtype None (the graph decides: storage or fp32 norms); `kept_float`
    marks matrices the plan wanted quantized whose rows cannot be grouped."""
    out: dict[str, dict] = {}
    for name, shape in shapes.items():
        role = role_of(name)
        wanted = plan is not None and role is not None and len(shape) == 2 and plan.format_for(role, tied) is not None
        fmt = plan.matrix_format(role, shape[1], tied) if wanted else None
        if fmt is None:
            out[name] = {"fmt": None, "kept_float": wanted, "parts": {name: (tuple(shape), None)}}
        else:
            out[name] = {"fmt": fmt, "group": fmt.group_for(shape[1]),
                         "parts": {f"{name}.{sfx}": spec for sfx, spec in fmt.parts(tuple(shape)).items()}}
    return out
