"""The bit-level pieces every quantization format is built from, written once:
the 4-bit nibble packer and the e4m3 (fp8) code, each as numpy (compile-time
packing, tests, tools) and as a TIR expression (the kernels' decode).

Nibbles: 8 codes per uint32, nibble j of word w holding element 8w + j.

e4m3: 4 exponent bits, bias 7, 3 mantissa bits, no infinities; 448 is the
largest finite value. Encoded and decoded with integer arithmetic on the
float32 bits (the same on every target, so CPU and GPU agree bit for bit):
  decode  bits = (code & 0x7F) << 20 | (code & 0x80) << 24, + 120 << 23 unless 0
  encode  round the float32 mantissa to 3 bits (RNE on the bits), re-bias;
          values under 2^-6 flush to zero (codes never hold subnormals or NaN).

TVM is reached only inside the TIR helpers, never at import.
"""

from __future__ import annotations

import numpy as np

FP8_MAX = 448.0
FP8_MIN_NORMAL = 2.0**-6
FP8_NAN_CODES = (0x7F, 0xFF)  # e4m3 NaN: never written by an encoder here

_SHIFTS = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """codes [n, k] in [0, 15] (k a multiple of 8) -> uint32 [n, k // 8]."""
    n, k = codes.shape
    c = np.asarray(codes).astype(np.uint32).reshape(n, k // 8, 8)
    return np.bitwise_or.reduce(c << _SHIFTS, axis=2).astype(np.uint32)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint32 [n, k // 8] -> codes [n, k] as uint8."""
    n, w = packed.shape
    return ((packed[..., None] >> _SHIFTS) & 15).reshape(n, w * 8).astype(np.uint8)


def round_f16(x: np.ndarray) -> np.ndarray:
    """Round to fp16 (the stored precision of scales), back in float64 for the arithmetic."""
    return np.asarray(x, dtype=np.float64).astype(np.float16).astype(np.float64)


def row_scales(x: np.ndarray, qmax: float) -> tuple[np.ndarray, np.ndarray]:
    """x [..., n] float32 -> (scale [...], 1 / scale [...]) that map each row's
    maximum magnitude to qmax; an all-zero row gets scale 0 and inverse 0."""
    amax = np.abs(x).max(axis=-1)
    scale = (amax / np.float32(qmax)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(qmax) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return scale, inv


def fp8_encode(y: np.ndarray) -> np.ndarray:
    """float32 values with |y| <= 448 -> e4m3 codes (uint8), as the kernels do."""
    y = np.asarray(y, dtype=np.float32)
    bits = y.view(np.uint32)
    mag = (np.abs(y).view(np.uint32)).astype(np.int64)
    r = mag + 0x7FFFF + ((mag >> 20) & 1)
    code = np.clip((r >> 20) - (120 << 3), 0, 0x7E)
    code = np.where(np.abs(y) < FP8_MIN_NORMAL, 0, code)
    return (code | ((bits >> 31).astype(np.int64) << 7)).astype(np.uint8)


def fp8_decode(code: np.ndarray) -> np.ndarray:
    c = np.asarray(code, dtype=np.uint32)
    mag = c & 0x7F
    bits = np.where(mag == 0, 0, (mag << 20) + (120 << 23)) | ((c & 0x80) << 24)
    return bits.astype(np.uint32).view(np.float32)


def _tir():
    from ...tvm_compat import compiler  # noqa: PLC0415

    return compiler().tirx


def tir_nibble(q, n, k):
    """Code k of row n of packed uint32 nibbles q (a TE tensor), as uint32."""
    tir = _tir()
    return (q[n, k // 8] >> (tir.Cast("uint32", k % 8) * tir.const(4, "uint32"))) & tir.const(15, "uint32")


def tir_fp8_decode(code):
    """An e4m3 code (uint8 expression) -> its float32 value."""
    tir = _tir()
    u32 = lambda v: tir.const(v, "uint32")  # noqa: E731
    c = tir.Cast("uint32", code)
    mag = tir.bitwise_and(c, u32(0x7F))
    bits = tir.Select(mag == u32(0), u32(0), tir.shift_left(mag, u32(20)) + u32(120 << 23))
    return tir.reinterpret("float32", tir.bitwise_or(bits, tir.shift_left(tir.bitwise_and(c, u32(0x80)), u32(24))))


def tir_fp8_encode(y):
    """float32 y (|y| <= 448) -> its e4m3 code (uint8), as fp8_encode."""
    from ...tvm_compat import compiler  # noqa: PLC0415

    T = compiler().T
    mag = T.reinterpret("int32", T.fabs(y))
    r = mag + T.int32(0x7FFFF) + T.bitwise_and(T.shift_right(mag, T.int32(20)), T.int32(1))
    c = T.min(T.max(T.shift_right(r, T.int32(20)) - T.int32(120 << 3), T.int32(0)), T.int32(0x7E))
    c = T.if_then_else(T.fabs(y) < T.float32(FP8_MIN_NORMAL), T.int32(0), c)
    sign = T.bitwise_and(T.shift_right(T.reinterpret("int32", y), T.int32(31)), T.int32(1))
    return T.Cast("uint8", T.bitwise_or(c, T.shift_left(sign, T.int32(7))))
