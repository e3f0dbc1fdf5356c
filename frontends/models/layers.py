"""The layers and TE kernels every family builds from: the precision policy,
projections (float and quantized, marked with the attributes passes match
on), the embedding lookup, greedy pick on the device, RMSNorm, Linear."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...passes.quant import QuantPlan  # quantization formats: a layer below the models (tests/test_layers.py)
from ...tvm_compat import compiler

_tvm = compiler()  # nn.Module subclasses below need TVM when their classes are defined
nn = _tvm.nn
op = _tvm.op


COMPUTE_DTYPE = "float32"  # activations, accumulation and the KV cache on CPU


@dataclass(frozen=True)
class Precision:
    """storage: the big matrices' dtype in the artifact; compute: activations,
    norms, the KV cache. CPU: compute fp32 (fp16 arithmetic is not native);
    GPU: compute = storage (bf16/fp16 tensor-core math, fp32 accumulation)."""

    storage: str
    compute: str = COMPUTE_DTYPE
    quant: QuantPlan | None = None  # quantized matrices by role (None: all float)

    def format_for(self, role: str, k: int, tied: bool = False):
        """The quantized format of a matrix of this role with rows of k weights, or None (float)."""
        return self.quant.matrix_format(role, k, tied) if self.quant is not None else None

    def layer(self, i: int) -> Precision:
        """The precision decoder layer i is built with: its own formats where the plan has them (--quant gguf)."""
        return Precision(self.storage, self.compute, self.quant.for_layer(i)) if self.quant is not None and self.quant.layers else self


def _precision(dtype) -> Precision:
    return dtype if isinstance(dtype, Precision) else Precision(dtype)


def to_compute(w, compute: str = COMPUTE_DTYPE):
    """Weights are stored in the artifact's dtype (fp16/bf16 halve the bytes a
    token reads); arithmetic is in `compute`. The cast fuses into the consuming
    kernel, so converted weights only ever exist in registers."""
    return w if w.dtype == compute else w.astype(compute)


# What a projection kernel is, set on its PrimFunc on purpose so that passes
# (passes/cuda_projections.py) match it by attribute, never by its name:
# OP_ATTR "matmul" (float W) | "qmatmul" (quantized W); ROLE_ATTR "projection" | "lm_head".
OP_ATTR, ROLE_ATTR = "kiln.op", "kiln.role"
QFORMAT_ATTR = "kiln.qformat"  # a qmatmul's weight format (passes/quant WEIGHT_FORMATS name)


def nt_matmul(x, w, name: str = "NT_matmul", out_dtype: str | None = None, role: str = "projection"):
    """x @ w^T with w in its storage dtype: x  # [*, k], w  # [n, k] -> [*, n] in
    out_dtype (default: x's dtype).

    One TE kernel with the casts inside, so fp16/bf16 weights are converted in
    registers (FuseOps would leave a separate cast kernel that writes an fp32
    copy of the whole matrix every call). 16-bit activations accumulate in
    fp32 (a bf16 running sum over K = 14336 terms loses most of its bits);
    the result is rounded once, at the end."""
    te = _tvm.te
    out_dtype = str(out_dtype or x.dtype)

    def compute(xt, wt):
        *lead, k_ext = xt.shape
        k = te.reduce_axis((0, k_ext), name="k")
        x_dtype = str(xt.dtype)
        acc = "float32" if "16" in x_dtype or out_dtype == "float32" else x_dtype

        def body(*idx):
            xv, wv = xt[(*idx[:-1], k)], wt[idx[-1], k]
            if str(xv.dtype) != acc:
                xv = xv.astype(acc)
            if str(wv.dtype) != acc:
                wv = wv.astype(acc)
            return te.sum(xv * wv, axis=k)

        out = te.compute((*lead, wt.shape[0]), body, name=name)
        if acc == out_dtype:
            return out
        return te.compute(out.shape, lambda *i: out(*i).astype(out_dtype), name=name + "_cast")

    return op.tensor_expr_op(compute, name, [x, w], attrs={OP_ATTR: "matmul", ROLE_ATTR: role})


def take(x, indices, axis: int, name: str = "take"):
    """x[indices] along `axis`, clipping out-of-range indices instead of reading
    out of bounds (relax's default "fast" mode reads them, and TVM prints a
    warning about that on every compile). Token ids are checked by the runtime;
    this keeps a kernel safe even where a check is missed."""
    r = _tvm.relax
    return nn.wrap_nested(r.op.take(x._expr, indices._expr, axis=axis, mode="clip"), name)


def _argmax_chunks(vocab: int) -> int:
    """Chunks of a two-stage argmax over `vocab` logits: the largest power of two up to 256
    that divides it (1: one stage)."""
    c = 256
    while c > 1 and vocab % c:
        c //= 2
    return c if c >= 16 else 1


def greedy_pick(logits, vocab: int):
    """logits  # [1, 1, vocab] float32 -> [2] int32: the argmax, and 1 if every
    logit is finite (0 if any is NaN/Inf, which the runtime turns into an error
    as the host sampler does). Lets greedy decoding read 8 bytes per token instead
    of the whole logits row.

    One pass over the logits: non-finite values count as +inf in the argmax, so
    if any exists the argmax lands on one, and checking the picked logit alone
    tells whether all were finite. (A separate all-finite reduction got TVM's
    one-thread fallback schedule: 128k serial loads.) Two stages: the argmax of
    each of C chunks (one thread block each), then of the C chunk maxima; ties go
    to the first chunk, then the first index in it -- the one-stage argmax's
    first occurrence. One block over the whole row took 25 us of an 8B decode
    step on the H200 (98 us over 64k logits under another schedule)."""
    r = _tvm.relax
    x = logits._expr
    inf = r.const(float("inf"), "float32")
    xf = r.op.where(r.op.isfinite(x), x, inf)
    c = _argmax_chunks(vocab)
    if c == 1:
        best = r.op.reshape(r.op.argmax(xf, axis=2, keepdims=False), [1])  # [1] int64
    else:
        parts = r.op.reshape(xf, [c, vocab // c])
        inner = r.op.argmax(parts, axis=1, keepdims=True)  # [c, 1] int64: each chunk's first max
        maxima = r.op.reshape(r.op.gather_elements(parts, inner, axis=1), [c])
        outer = r.op.argmax(maxima, axis=0, keepdims=True)  # [1]: the first chunk holding the max
        best = outer * r.const(vocab // c, "int64") + r.op.take(r.op.reshape(inner, [c]), outer, axis=0, mode="clip")
    best = r.op.astype(best, "int32")
    picked = r.op.take(r.op.reshape(x, [vocab]), best, axis=0, mode="clip")  # [1]
    return nn.wrap_nested(r.op.concat([best, r.op.astype(r.op.isfinite(picked), "int32")], axis=0), "greedy_pick")


def greedy_pick_rows(logits):
    """logits  # [B, 1, vocab] float32 -> [B, 2] int32: per row the argmax and 1 if
    every logit of the row is finite (greedy_pick for a batch, with its one-pass
    trick: non-finite values count as +inf in the argmax, so the picked logit
    alone says whether the row was all finite; a separate max over the row got a
    one-block schedule on CUDA, 4.9 ms of an 8B step at B = 8)."""
    r = _tvm.relax
    x = logits._expr
    inf = r.const(float("inf"), "float32")
    best = r.op.argmax(r.op.where(r.op.isfinite(x), x, inf), axis=2, keepdims=True)  # [B, 1, 1] int64
    picked = r.op.gather_elements(x, best, axis=2)  # [B, 1, 1]
    finite = r.op.astype(r.op.isfinite(r.op.squeeze(picked, axis=[2])), "int32")  # [B, 1]
    best = r.op.astype(r.op.squeeze(best, axis=[2]), "int32")  # [B, 1]
    return nn.wrap_nested(r.op.concat([best, finite], axis=1), "greedy_pick_rows")


def all_reduce(x, shards: int, name: str = "allreduce"):
    """The sum of x over the shards of a tensor-parallel graph (after a row-parallel
    projection); x itself when the graph is whole. kiln.ccl.allreduce is kiln's
    collective plugin (compiler/ccl/kiln_ccl.cc), registered in each worker process."""
    if shards == 1:
        return x
    return op.extern("kiln.ccl.allreduce", [x], nn.Tensor.placeholder(x.shape, x.dtype, name=name))


def gather_vocab(logits, shards: int, vocab: int):
    """logits  # [b, s, ceil(vocab / shards)] of this shard's LM-head rows -> [b, s, vocab]:
    every shard's rows, gathered (rank-major [shards, b, s, v] from the collective), less
    the zero rows that pad the last shard."""
    if shards == 1:
        return logits
    b, s, v = logits.shape
    g = op.extern("kiln.ccl.allgather", [logits], nn.Tensor.placeholder([shards, b, s, v], logits.dtype, name="gathered"))
    g = op.reshape(op.permute_dims(g, [1, 2, 0, 3]), [b, s, v * shards])
    if v * shards != vocab:
        g = op.split(g, [vocab], axis=2)[0]
    return g


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last axis. The weight
    stays fp32 whatever the artifact dtype (a few KB per layer)."""

    def __init__(self, size: int, eps: float, dtype):
        self.weight = nn.Parameter((size,), _precision(dtype).compute)
        self.eps = eps

    def forward(self, x):
        return op.rms_norm(x, self.weight, axes=[-1], epsilon=self.eps)


def head_rms_norm(qkv, q_weight, k_weight, n_q: int, n_k: int, eps: float, name: str = "qk_norm"):
    """RMSNorm of each query head with q_weight and each key head with k_weight, value heads
    passed through: qkv  # [b, s, n_q + n_k + n_v, head_dim] -> the same shape (Qwen3, Gemma 3).
    One op where split + two RMSNorms + concat were six kernels on CUDA (~14 us per layer of
    Qwen3-30B-A3B's decode step, all launch latency); fp32 inside, as op.rms_norm."""
    te, tir = _tvm.te, _tvm.tirx

    def compute(xt, qw, kw):
        b, s, _, hd = xt.shape
        r = te.reduce_axis((0, hd), name="d")
        f32 = lambda v: v.astype("float32")  # noqa: E731
        # every head's sum (the value heads' unused): a reduction whose spatial axes are the
        # output's, the shape GPU reduction rules schedule as one kernel (dlight mis-scheduled
        # a reduction over the first n_q + n_k heads read as ss[min(h, n_q + n_k - 1)])
        ss = te.compute(xt.shape[:3], lambda i, j, h: te.sum(f32(xt[i, j, h, r]) * f32(xt[i, j, h, r]), axis=r), name=name + "_sq")

        def body(i, j, h, d):
            x = f32(xt[i, j, h, d])
            inv = tir.rsqrt(ss[i, j, h] / tir.const(int(hd), "float32") + tir.const(eps, "float32"))
            w = tir.Select(h < n_q, f32(qw[d]), f32(kw[d]))
            return tir.Select(h < n_q + n_k, x * inv * w, x).astype(xt.dtype)

        return te.compute(xt.shape, body, name=name)

    return op.tensor_expr_op(compute, name, [qkv, q_weight, k_weight])


def rope_inv_freq(theta: float, head_dim: int, factors=None):
    """RoPE's inverse frequencies  # [head_dim / 2] float32, computed as transformers does
    (float32 numpy): 1 / (factor_i * theta^(2i / head_dim)); factors: per-frequency divisors
    (LongRoPE's short_factor, or linear scaling's factor), default 1."""
    shape = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    ext = np.ones(head_dim // 2, np.float32) if factors is None else np.broadcast_to(np.asarray(factors, np.float32), (head_dim // 2,))
    return (np.float32(1.0) / (ext * np.float32(theta) ** shape)).astype(np.float32)


def rope(x, positions, inv_freq, mscale: float = 1.0, name: str = "rope"):
    """Rotate-half RoPE in the graph, for families whose RoPE the KV cache's one
    RoPE on append cannot give (Gemma 3: a base per layer type; Phi-3: LongRoPE).
    x  # [b, s, heads, head_dim]; positions  # [b * s] int32 (the cache's
    get_query_positions); inv_freq  # [head_dim / 2] (rope_inv_freq): angle =
    position * inv_freq[i], cos and sin times mscale (LongRoPE's attention factor),
    in float32."""
    te, tir = _tvm.te, _tvm.tirx

    def compute(xt, pt, ft):
        seq, half = xt.shape[1], int(xt.shape[3]) // 2

        def body(b, s, h, d):
            angle = pt[b * seq + s].astype("float32") * ft[tir.truncmod(d, half)]
            cos, sin = tir.cos(angle), tir.sin(angle)
            if mscale != 1.0:
                cos, sin = cos * tir.const(mscale, "float32"), sin * tir.const(mscale, "float32")
            other = tir.if_then_else(d < half, -xt[b, s, h, d + half], xt[b, s, h, d - half]).astype("float32")
            return (xt[b, s, h, d].astype("float32") * cos + other * sin).astype(xt.dtype)

        return te.compute(xt.shape, body, name=name)

    return op.tensor_expr_op(compute, name, [x, positions, nn.Tensor.from_const(np.asarray(inv_freq, np.float32))])


class QWeight(nn.Module):
    """A quantized [N, K] matrix stored as the arrays of its format (params
    `q`, `s`, `z` for formats with a minimum, `d`, `m` for super-block scales;
    passes/quant/formats/). Never dequantized as a whole: kernels decode the
    codes where they read them."""

    def __init__(self, shape: tuple[int, int], fmt):
        self.fmt = fmt
        self.shape = tuple(shape)
        self.group = fmt.group_for(shape[1])
        self.q = self.s = self.z = self.d = self.m = None
        self._parts = tuple(fmt.parts(self.shape))
        for sfx, (shp, dt) in fmt.parts(self.shape).items():
            setattr(self, sfx, nn.Parameter(shp, dt))

    def params(self) -> list:
        return [getattr(self, sfx) for sfx in self._parts]


def qmatmul_compute(fmt, group: int, n: int, name: str = "NT_qmatmul", out_dtype: str = "float32"):
    """The TE of x [..., K] @ dequant(W [n, K])^T over the format's arrays (q_matmul's body;
    passes/quantize_graph_weights.py emits it for ONNX graphs' matmuls)."""
    te = _tvm.te

    def compute(xt, *arrays):
        *lead, k_ext = xt.shape
        deq = fmt.te_weight(group, *arrays)
        w = te.compute((n, k_ext), deq, name=name + "_dequant")
        k = te.reduce_axis((0, k_ext), name="k")

        def body(*idx):
            xv = xt[(*idx[:-1], k)]
            if str(xv.dtype) != "float32":
                xv = xv.astype("float32")
            return te.sum(xv * w[idx[-1], k], axis=k)

        out = te.compute((*lead, n), body, name=name)
        if out_dtype == "float32":
            return out
        return te.compute(out.shape, lambda *i: out(*i).astype(out_dtype), name=name + "_cast")

    return compute


def q_matmul(x, qw: QWeight, name: str = "NT_qmatmul", out_dtype: str | None = None, role: str = "projection"):
    """x @ dequant(W)^T: the dequantize stage and the reduction are one TIR
    function; the schedules inline the dequantize into the GEMV (decode) or
    into the per-tile packing of the GEMM (prefill), so a dequantized matrix
    never exists in memory."""
    compute = qmatmul_compute(qw.fmt, qw.group, qw.shape[0], name, str(out_dtype or x.dtype))
    return op.tensor_expr_op(compute, name, [x, *qw.params()], attrs={OP_ATTR: "qmatmul", ROLE_ATTR: role, QFORMAT_ATTR: qw.fmt.name})


def q_take(qw: QWeight, ids, out_dtype: str):
    """Rows `ids` of a quantized table, dequantized (the embedding lookup)."""
    te = _tvm.te

    def compute(idt, *arrays):
        deq = qw.fmt.te_weight(qw.group, *arrays)
        return te.compute((idt.shape[0], qw.shape[1]), lambda t, k: deq(idt[t], k).astype(out_dtype), name="q_take")

    return op.tensor_expr_op(compute, "q_take", [ids, *qw.params()])


def matmul_any(x, w, name: str = "NT_matmul", out_dtype: str | None = None, role: str = "projection"):
    if isinstance(w, QWeight):
        return q_matmul(x, w, "NT_qmatmul" if name == "NT_matmul" else name, out_dtype, role)
    return nt_matmul(x, w, name, out_dtype, role)


class Linear(nn.Module):
    """y = x @ W^T (+ b). W stays [out, in] so decode reads it row by row.
    `role` names the projection for the quantization plan (--keep ROLE=...)."""

    def __init__(self, in_features: int, out_features: int, dtype, bias: bool = False, role: str = "body"):
        p = _precision(dtype)
        self.compute = p.compute
        fmt = p.format_for(role, in_features) if role != "body" else None
        self.weight = QWeight((out_features, in_features), fmt) if fmt is not None else nn.Parameter((out_features, in_features), p.storage)
        self.bias = nn.Parameter((out_features,), p.storage) if bias else None

    def forward(self, x):
        y = matmul_any(x, self.weight)
        return y + to_compute(self.bias, self.compute) if self.bias is not None else y
