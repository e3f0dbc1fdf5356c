"""What a weight format is: one object owning everything kiln knows about it.

A format stores an [N, K] matrix (K = the reduction axis; rows stay rows) as a
few arrays (`parts`: codes `q`, scales `s`, a minimum `z` for formats
that have one, super-block scales `d`, `m` for q4k) and answers, for every stage of the pipeline:
  compile time   quantize (numpy, once), dequantize (the reference);
  graph          te_weight: the fp32 value of element (n, k) as a TE
                 expression over the stored arrays, which the kernels inline
                 where they read the codes (frontends/models/layers.py);
  kernels        cuda_code: the code kind of kiln's CUDA GEMV/GEMM templates
                 (passes/kernels/cuda/*.cuh), None when it has none (dlight
                 schedules the TE kernel);
  runtime        invalid_codes: byte values random weights must avoid
                 (recorded per param in the manifest, so the runtime needs no
                 format knowledge);
  docs / tools   bits_per_weight.
Each concrete format is one file in passes/quant/formats/. A stack of
matrices [..., N, K] (a mixture of experts' experts, one param per layer) is
stored as the same arrays with the leading axes kept: every format is row-local,
so the stack quantizes as its [E * N, K] rows (the `stacked_*` methods).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import CompileError


@dataclass(frozen=True)
class WeightFormat:
    name: str  # --quant / --keep code, recorded in the manifest
    bits: int
    group: int  # weights per scale along K; 0: one scale per row (per output channel)
    zero: bool = False  # a per-group minimum is stored (asymmetric)
    cuda_code: str | None = None  # kiln's CUDA GEMV/GEMM template kind
    invalid_codes: tuple[int, ...] = ()  # byte values no encoder writes
    rank: int = 0  # order in listings (--help, error messages)
    float8: bool = False  # the codes are e4m3 floats, not integers
    weighs_importance: bool = False  # quantize() takes `importance` [K] (per-column activation energy: compiler/calibrate.py)

    def _group(self, k: int) -> int | None:
        if self.group == 0:
            return k
        g = self.group
        while g >= 8 and k % g:
            g //= 2
        return g if g >= 8 and k % g == 0 else None

    def fits(self, k: int) -> bool:
        """Rows of k weights can be grouped (else the matrix stays float: see plan.expand_params)."""
        return self._group(k) is not None

    def group_for(self, k: int) -> int:
        """The group a row of k weights gets: the largest power of two <= the
        format's group that divides k (SmolLM2's 576 with g128 -> 64)."""
        g = self._group(k)
        if g is None:
            raise CompileError(f"--quant {self.name}: a row of {k} weights cannot be split into groups of 8 or more")
        return g

    def bits_per_weight(self, k: int) -> float:
        """Stored bits per weight, scales and minimum included, for rows of k."""
        return sum(int(np.prod(shape)) * np.dtype(dt).itemsize * 8 for shape, dt in self.parts((1, k)).values()) / k

    # -- stacks of matrices [..., N, K] (experts), written once from the 2-D ones below ------------
    def stacked_parts(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
        """parts() of an [..., N, K] stack: the leading axes kept in every array."""
        lead = tuple(shape[:-2])
        return {sfx: ((*lead, *shp), dt) for sfx, (shp, dt) in self.parts(tuple(shape[-2:])).items()}

    def quantize_stacked(self, w: np.ndarray, refine: int = 4, **kw) -> dict[str, np.ndarray]:
        """[..., N, K] float -> stacked_parts arrays (rows are quantized alone, so a stack is its rows)."""
        w = np.asarray(w)
        parts = self.quantize(w.reshape(-1, w.shape[-1]), refine, **kw)
        return {sfx: parts[sfx].reshape(shp) for sfx, (shp, _) in self.stacked_parts(w.shape).items()}

    def dequantize_stacked(self, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        """The float32 [..., N, K] stack (reference for tests and tools)."""
        rows = (int(np.prod(shape[:-1])), shape[-1])
        return self.dequantize({sfx: a.reshape(rows[0], -1) for sfx, a in parts.items()}, rows).reshape(shape)

    def te_stacked_weight(self, group: int, *arrays):
        """(e, n, k) -> the fp32 weight of matrix e of a stack [E, N, K], as a TE expression."""
        def weight(e, n, k):
            return self.te_weight(group, *[_Fixed(a, e) for a in arrays])(n, k)
        return weight

    # -- to be defined by each format -------------------------------------------------------------
    def parts(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], str]]:
        """Suffix -> (shape, dtype) of the stored arrays of an [N, K] matrix."""
        raise NotImplementedError

    def quantize(self, w: np.ndarray, refine: int = 4) -> dict[str, np.ndarray]:
        """[N, K] float -> the stored arrays (see parts)."""
        raise NotImplementedError

    def dequantize(self, parts: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
        """The float32 matrix the kernels compute with (reference for tests and tools)."""
        raise NotImplementedError

    def te_weight(self, group: int, q, s, z=None, d=None, m=None):
        """(n, k) -> the fp32 weight, as a TE expression over the stored arrays
        (in parts() order)."""
        raise NotImplementedError


class _Fixed:
    """A TE tensor [E, ...] seen as one of its matrices: t[i, j] reads t[e, i, j]."""

    def __init__(self, tensor, e):
        self.tensor, self.e = tensor, e
        self.shape = tuple(tensor.shape)[1:]

    def __getitem__(self, idx):
        return self.tensor[(self.e, *(idx if isinstance(idx, tuple) else (idx,)))]
