"""CUDA projections: kiln's own kernels in place of the models' projection calls.

Decode (batch 1): fused GEMV kernels in place of RMSNorm -> GEMV, GEMV ->
residual add, and SwiGLU -> GEMV -> residual add. Prefill (a symbolic number
of tokens): the tensor-core GEMM, with the residual add fused when there is one.

Runs on the Relax graph before legalization, where the neighbours are still
named ops (R.nn.rms_norm, R.add, R.nn.silu) and the projections are calls of
kiln's TE kernels that the model marked on purpose (frontends/models/layers.py
OP_ATTR "matmul" | "qmatmul", ROLE_ATTR "projection" | "lm_head"; below,
NT_matmul = a float projection, NT_qmatmul = a quantized one). Only static
[1, 1, K] activations match (the decode function; prefill has a symbolic
sequence length), only when the projection's input and output are in the
weights' dtype, and only when the fused-away value has no other use. Biases
(Qwen2's qkv, `attention_out_bias`) sit between the GEMV and the add, so
those graphs keep the generic path. The now-dead neighbours are removed by
DeadCodeElimination later in the pipeline.

    rms_norm(x, g) -> NT_matmul(., W)                   => kiln_rmsnorm_gemv(x, g, W)
    add(r, NT_matmul(a, W))                              => kiln_gemv_residual(a, W, r)
    add(r, NT_matmul(silu(gu[0]) * gu[1], W)), gu=split => kiln_silu_mul_gemv_residual(gu_in, W, r)
    NT_matmul(a [1, s, K], W)                            => kiln_gemm(a, W)             (s symbolic: a prompt)
    NT_matmul(a [B, 1, K], W), projection or lm_head     => kiln_gemm_rows(a, W)        (B symbolic: decode_batch)
    add(r, NT_matmul(a [B, 1, K], W))                    => kiln_gemm_rows_residual(a, W, r)
    NT_qmatmul / lm_head (a [1, 1, K], q, s[, z])        => kiln_qgemv(a, q, s[, z])    (quantized, decode)
    add(r, NT_qmatmul(a [1, 1, K], q, s[, z]))           => kiln_qgemv_residual(a, q, s[, z], r)
    NT_qmatmul (a [1, s, K], q, s[, z]), 16-bit         => kiln_qgemm(a, q, s[, z])    (quantized, prefill, tensor cores)
    NT_qmatmul (a [B, 1, K], q, s), fp8, 16-bit a        => kiln_gemm_rows_f8(a, q, s)  (decode_batch; projection or LM head)
    add(r, NT_qmatmul(a [1, s, K], q, s)), fp8, Hopper  => kiln_qgemm_f8_residual(a, q, s, r)  (prompt, fp8 tensor cores)
    NT_qmatmul lm_head (a [1, n, K], q, s), fp8          => kiln_gemm_rows_f8(a as [n, 1, K], q, s)  (a prompt's chosen rows)
    add(r, NT_matmul(a [1, s, K], W))                    => kiln_gemm_residual(a, W, r)
"""

from __future__ import annotations

from .kernels.gemm_cuda import (ROWS_QCODES, f8_tensor_cores, gemm, gemm_residual, gemm_rows, gemm_rows_q, gemm_supported, qgemm,
                                 qgemm_f8_residual, qgemm_supported)
from .kernels.rows_cuda import rmsnorm_rows, rows_supported, silu_mul_rows
from .kernels.gemv_cuda import (QGEMV_SUPER, gemv_residual, gemv_supported, q4k_expand, qgemv, qgemv_mma_config, qgemv_supported,
                                 rmsnorm_gemv, silu_mul_gemv_residual)
from ..frontends.models.layers import OP_ATTR, QFORMAT_ATTR, ROLE_ATTR
from .quant import WEIGHT_FORMATS
from ..tvm_compat import compiler
from .relax_mutation import rewrite_functions as rewrite_each

_t = compiler()
relax = _t.relax
tirx = _t.tirx


def _is_one(dim) -> bool:
    """A dimension of 1: a prompt's rows [1, s, K], or decode_batch's [B, 1, K] (the float GEMM
    takes both: M contiguous rows; the quantized GEMM only the first)."""
    return isinstance(dim, tirx.IntImm) and int(dim) == 1


def _static_shape(expr) -> tuple[int, ...] | None:
    sinfo = expr.ty
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return None
    try:
        return tuple(int(d) for d in sinfo.shape.values)
    except TypeError:  # symbolic
        return None


def _same_shape(a, b) -> bool:
    sa, sb = a.ty, b.ty
    if not isinstance(sa, relax.TensorType) or not isinstance(sb, relax.TensorType) or sa.shape is None or sb.shape is None:
        return False
    return str(sa.dtype) == str(sb.dtype) and len(sa.shape.values) == len(sb.shape.values) and all(
        _t.ffi.structural_equal(x, y) for x, y in zip(sa.shape.values, sb.shape.values))


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


class _Analysis:
    """var -> bound value and use counts, over one function's dataflow blocks."""

    def __init__(self, func):
        self.value: dict = {}
        self.uses: dict = {}
        for block in func.body.blocks:
            for b in block.bindings:
                self.value[b.var] = b.value
                relax.analysis.post_order_visit(b.value, self._count)
        relax.analysis.post_order_visit(func.body.body, self._count)

    def _count(self, e):
        if isinstance(e, relax.Var):
            self.uses[e] = self.uses.get(e, 0) + 1

    def bound(self, e):
        return self.value.get(e) if isinstance(e, relax.Var) else None

    def single_use(self, e) -> bool:
        return isinstance(e, relax.Var) and self.uses.get(e, 0) == 1


def rewrite_functions(rw):
    """rw (a PyExprMutator with `mod_`, `an`) over every Relax function of its module, with rw.an
    that function's _Analysis; the rewritten module."""
    return rewrite_each(rw, rw.mod_, lambda func: setattr(rw, "an", _Analysis(func)))


def _is_op(call, name: str) -> bool:
    return isinstance(call, relax.Call) and isinstance(call.op, _t.tvm.ir.Op) and call.op.name == name


def swiglu_input(an: _Analysis, a):
    """a = silu(gu[0]) * gu[1] with gu = split(h, 2, axis=-1), each step used once -> h, or None."""
    mul = an.bound(a)
    if not _is_op(mul, "relax.multiply") or not an.single_use(a):
        return None
    silu = an.bound(mul.args[0])
    if not _is_op(silu, "relax.nn.silu") or not an.single_use(mul.args[0]):
        return None
    g, u = an.bound(silu.args[0]), an.bound(mul.args[1])
    if not (isinstance(g, relax.TupleGetItem) and isinstance(u, relax.TupleGetItem)) or g.index != 0 or u.index != 1:
        return None
    if not g.tuple_value.same_as(u.tuple_value):
        return None
    split = an.bound(g.tuple_value)
    if not _is_op(split, "relax.split") or int(split.attrs.indices_or_sections) != 2:
        return None
    return split.args[0]


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, gemm: bool = True, gemv: bool = True, qgemv: str = "4,4k,f8", wgmma: bool = False, qgemv_mma: bool = True,
                 fp8_act: bool = True):
        super().__init__(mod)
        self.use_gemm, self.use_gemv, self.wgmma, self.qgemv_mma, self.fp8_act = gemm, gemv, wgmma, qgemv_mma, fp8_act
        self.qgemv_bits = {b.strip() for b in str(qgemv).split(",") if b.strip()}  # code kinds: "4", "4k", "8", "f8"
        self.use_qgemv = bool(self.qgemv_bits)
        self.mod_ = mod
        self.an: _Analysis | None = None
        self.cache: dict = {}

    # --- recognisers ---------------------------------------------------------
    def _kind(self, call) -> tuple[str, str] | None:
        """(op, role) a model set on the called PrimFunc (frontends/models/layers.py
        OP_ATTR / ROLE_ATTR), or None: projections are matched by that, not by name."""
        if not _is_op(call, "relax.call_tir"):
            return None
        func = self.mod_[call.args[0]]
        attrs = func.attrs if isinstance(func, tirx.PrimFunc) and func.attrs is not None else {}
        if OP_ATTR not in attrs:
            return None
        return str(attrs[OP_ATTR]), str(attrs[ROLE_ATTR])

    def _gemv(self, call):
        """call = call_tir(<matmul projection>, (a [1,1,K], W [N,K])) in one dtype -> (a, W, K, N)."""
        if self._kind(call) != ("matmul", "projection") or len(call.args[1].fields) != 2:
            return None
        a, w = call.args[1].fields
        sa, sw, so = _static_shape(a), _static_shape(w), _static_shape(call)
        if sa is None or sw is None or so is None or len(sa) != 3 or sa[:2] != (1, 1) or len(sw) != 2:
            return None
        dt = _dtype(w)
        if _dtype(a) != dt or str(call.ty.dtype) != dt or not gemv_supported(sa[2], dt):
            return None
        return a, w, sa[2], sw[0]

    def _gemm(self, call, role: str = "projection", out: str | None = None):
        """call = call_tir(<matmul of role>, (a [1, s, K] | [B, 1, K], W [N, K])), s / B symbolic, 16-bit,
        out in W's dtype (or `out`) -> (a, W, K, N, rows): rows = decode_batch's [B, 1, K]."""
        if self._kind(call) != ("matmul", role) or len(call.args[1].fields) != 2:
            return None
        a, w = call.args[1].fields
        sw = _static_shape(w)
        shape = a.ty.shape.values if isinstance(a.ty, relax.TensorType) and a.ty.shape is not None else None
        if sw is None or shape is None or len(shape) != 3 or not (_is_one(shape[0]) or _is_one(shape[1])) or _static_shape(a) is not None:
            return None
        dt = _dtype(w)
        if _dtype(a) != dt or str(call.ty.dtype) != (out or dt) or not gemm_supported(sw[1], dt) or int(shape[2]) != sw[1]:
            return None
        return a, w, sw[1], sw[0], _is_one(shape[1])

    def _quantized(self, call, roles: tuple[str, ...], rows: bool = False):
        """call = call_tir(<qmatmul of one of roles>, (a [1, s, K], q, s[, z])) over a quantized
        [N, K] matrix -- or, with rows, decode_batch's a [B, 1, K] (B symbolic) -- -> (a, K, N,
        group, code kind), or None. The code kind is the CUDA template kind of the weight format
        the model named (QFORMAT_ATTR; passes/quant); formats with a minimum pass z, the others do not."""
        kind = self._kind(call)
        if kind is None or kind[0] != "qmatmul" or kind[1] not in roles or len(call.args[1].fields) not in (3, 4, 6):
            return None
        a, q, sc = call.args[1].fields[:3]
        shape = a.ty.shape.values if isinstance(a.ty, relax.TensorType) and a.ty.shape is not None else None
        sq, ss = _static_shape(q), _static_shape(sc)
        if shape is None or len(shape) != 3 or sq is None or len(sq) != 2 or ss is None or len(ss) != 2:
            return None
        if not (_is_one(shape[1]) and not _is_one(shape[0]) if rows else _is_one(shape[0])):
            return None
        try:
            K = int(shape[2])
        except TypeError:  # symbolic
            return None
        attrs = self.mod_[call.args[0]].attrs  # not None: _kind found OP_ATTR in it
        fmt = WEIGHT_FORMATS.get(str(attrs[QFORMAT_ATTR])) if QFORMAT_ATTR in attrs else None
        code = fmt.cuda_code if fmt is not None else None
        if code is None or len(call.args[1].fields) != 1 + len(fmt.parts((1, K))) or K % ss[1]:
            return None
        if code == QGEMV_SUPER:  # q4k: the kernels' block is the super-block (d's shape), groups of 32
            sd = _static_shape(call.args[1].fields[4])
            if K // ss[1] != 32 or sd is None or len(sd) != 2 or sd[1] == 0 or K % sd[1]:
                return None
            return a, K, sq[0], K // sd[1], code
        return a, K, sq[0], K // ss[1], code

    def _qgemv(self, call):
        """call = call_tir(<qmatmul projection | lm_head>, (a [1,1,K], q, s[, z])) -> (K, N, group, code, dtype, out dtype)."""
        hit = self._quantized(call, ("projection", "lm_head"))
        if hit is None or _static_shape(hit[0]) is None or _static_shape(hit[0])[:2] != (1, 1) or _static_shape(call) is None:
            return None
        a, K, N, group, code = hit
        dt, odt = _dtype(a), str(call.ty.dtype)
        if odt not in (dt, "float32") or not qgemv_supported(K, group, code, dt):
            return None
        return K, N, group, code, dt, odt

    def _qrows(self, call, prompt: bool = False):
        """call = call_tir(<qmatmul projection | lm_head>, (a [B, 1, K], q, s)), B symbolic, 16-bit a, a format
        with a row kernel (fp8) -> (K, N, code, dtype, out dtype). prompt: an LM head over a prompt's chosen
        rows a [1, n, K] instead (n symbolic), which the row kernel takes as n rows."""
        hit = self._quantized(call, ("lm_head",)) if prompt else self._quantized(call, ("projection", "lm_head"), rows=True)
        if hit is None or (prompt and _static_shape(hit[0]) is not None):
            return None
        a, K, N, group, code = hit
        dt, odt = _dtype(a), str(call.ty.dtype)
        if code not in ROWS_QCODES or group != K or K % 32 or dt not in ("bfloat16", "float16") or odt not in (dt, "float32"):
            return None  # (the row kernel takes one scale per row)
        return K, N, code, dt, odt

    def _qgemm(self, call):
        """call = call_tir(<qmatmul projection>, (a [1, s, K], q, s[, z])), s symbolic, 16-bit out = in -> (K, N, group, code, dtype).
        q4k: code "4k", group its super-block (the GEMM itself runs on 4-bit codes of group 32)."""
        hit = self._quantized(call, ("projection",))
        if hit is None or _static_shape(hit[0]) is not None:
            return None
        a, K, N, group, code = hit
        dt = _dtype(a)
        if str(call.ty.dtype) != dt or not qgemm_supported(K, *((32, "4") if code == QGEMV_SUPER else (group, code)), dt):
            return None
        return K, N, group, code, dt

    def _qgemv_residual(self, r, v, add):
        """add(r, NT_qmatmul(a [1, 1, K], ...)) -> the decode qgemv with r added in its epilogue, or None."""
        if not (self.use_qgemv and self.an.single_use(v)) or _static_shape(r) != _static_shape(add):
            return None
        q = self.an.bound(v)
        hit = self._qgemv(q) if _is_op(q, "relax.call_tir") else None
        if hit is None or hit[3] not in self.qgemv_bits:
            return None
        K, N, group, bits, dt, odt = hit
        if odt != dt or _dtype(r) != dt or str(add.ty.dtype) != dt:
            return None
        tc = "mma" if self.qgemv_mma and qgemv_mma_config(K, N, group, bits, dt) else ""
        gv = self._func((f"qgemv{bits}{tc}g{group}_residual", K, N, dt),
                        lambda: qgemv(K, N, group, bits, dt, odt, mma=bool(tc), residual=True))
        return relax.call_tir(gv, [*q.args[1].fields, r], add.ty)

    def _qgemm_f8_residual(self, r, v, add):
        """add(r, NT_qmatmul(a [1, s, K], e4m3 q, s)) on Hopper -> the fp8 prompt GEMM with r added in its epilogue, or None."""
        if not (self.use_gemm and self.an.single_use(v)) or not _same_shape(r, v):
            return None
        q = self.an.bound(v)
        hit = self._qgemm(q) if _is_op(q, "relax.call_tir") else None
        if hit is None or hit[3] != "f8" or not f8_tensor_cores(hit[0], self.wgmma, self.fp8_act):
            return None
        if _dtype(r) != hit[4] or str(add.ty.dtype) != hit[4]:
            return None
        K, N, _, _, dt = hit
        gv = self._func(("qgemm_f8_residual", K, N, dt), lambda: qgemm_f8_residual(K, N, dt))
        return relax.call_tir(gv, [*q.args[1].fields, r], v.ty)

    def _prompt_rows(self, gv, a, weight, K: int, N: int, odt: str):
        """A prompt's chosen rows a [1, n, K] through an LM head's row kernel gv (with the weight's arrays) as n rows of
        one token, reshaped back to [1, n, N]: dlight's / TVM's schedules for them read the LM head far below bandwidth
        (bf16 8B: 0.55 TB/s; the fp8 one took 1.67 ms for one row on the H200)."""
        n = a.ty.shape.values[1]
        a_rows = self.builder_.emit(relax.op.reshape(a, (n, 1, K)), "logit_rows_b")
        y = self.builder_.emit(relax.call_tir(gv, [a_rows, *weight], relax.TensorType((n, 1, N), odt)), "logits_b")
        return relax.op.reshape(y, (1, n, N))

    def _rows_q_func(self, K: int, N: int, code: str, dt: str, odt: str):
        return self._func((f"gemm_rows_{code}_{odt}", K, N, dt), lambda: gemm_rows_q(K, N, dt, code, odt, wgmma=self.wgmma, f8_act=self.fp8_act))

    def _swiglu_input(self, a):
        return swiglu_input(self.an, a)

    def _func(self, key, make):
        if key not in self.cache:
            name = f"kiln_{key[0]}_{key[2]}x{key[1]}_{key[3]}"  # unique per shape: each is its own kernel
            self.cache[key] = self.builder_.add_func(make().with_attr("global_symbol", name), name)
        return self.cache[key]

    # --- rewriting -------------------------------------------------------------
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if _is_op(call, "relax.add") and self.an is not None:
            for r, v in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                hit = self._gemv(self.an.bound(v)) if self.use_gemv and self.an.single_use(v) else None
                if hit is None or _static_shape(r) != _static_shape(call):
                    continue
                a, w, K, N = hit
                dt = _dtype(w)
                out = relax.TensorType((1, 1, N), dt)
                h = self._swiglu_input(a)
                if h is not None and _static_shape(h) == (1, 1, 2 * K):
                    gv = self._func(("silu_mul_gemv_residual", K, N, dt), lambda: silu_mul_gemv_residual(K, N, dt))
                    return relax.call_tir(gv, [h, w, r], out)
                gv = self._func(("gemv_residual", K, N, dt), lambda: gemv_residual(K, N, dt))
                return relax.call_tir(gv, [a, w, r], out)
            for r, v in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                fused = self._qgemv_residual(r, v, call)
                if fused is None:
                    fused = self._qgemm_f8_residual(r, v, call)
                if fused is not None:
                    return fused
            for r, v in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                hit = self._gemm(self.an.bound(v)) if self.use_gemm and self.an.single_use(v) else None
                if hit is None or not _same_shape(r, v):
                    continue
                a, w, K, N, rows = hit
                dt = _dtype(w)
                if rows:
                    gv = self._func(("gemm_rows_residual", K, N, dt), lambda: gemm_rows(K, N, dt, residual=True, wgmma=self.wgmma))
                else:
                    gv = self._func(("gemm_residual", K, N, dt), lambda: gemm_residual(K, N, dt, wgmma=self.wgmma))
                return relax.call_tir(gv, [a, w, r], v.ty)
        if self.use_gemm and _is_op(call, "relax.call_tir"):
            hit = self._qrows(call)
            if hit is not None:
                return relax.call_tir(self._rows_q_func(*hit), list(call.args[1].fields), call.ty)
            hit = self._qgemm(call)
            if hit is not None:
                K, N, group, code, dt = hit
                args = list(call.args[1].fields)
                if code == QGEMV_SUPER:  # q4k: its scales and minima as fp16 per 32 (one small kernel per call), then q4g32's GEMM
                    ex = self._func((f"q4k_expand{group}", K, N, "float16"), lambda: q4k_expand(K, N, group))
                    ty = relax.TensorType((N, K // 32), "float16")
                    sz = relax.call_tir(ex, args[2:6], [ty, ty])
                    args, group, code = [args[0], args[1], relax.TupleGetItem(sz, 0), relax.TupleGetItem(sz, 1)], 32, "4"
                gv = self._func((f"qgemm{code}g{group}", K, N, dt), lambda: qgemm(K, N, group, code, dt, wgmma=self.wgmma, f8_act=self.fp8_act))
                return relax.call_tir(gv, args, call.ty)
            hit = self._qrows(call, prompt=True)
            if hit is not None:  # a prompt's chosen rows through an e4m3 LM head
                K, N, _, _, odt = hit
                return self._prompt_rows(self._rows_q_func(*hit), call.args[1].fields[0], call.args[1].fields[1:], K, N, odt)
        if self.use_qgemv and _is_op(call, "relax.call_tir"):
            hit = self._qgemv(call)
            if hit is not None and hit[3] in self.qgemv_bits:
                K, N, group, bits, dt, odt = hit
                tc = "mma" if self.qgemv_mma and qgemv_mma_config(K, N, group, bits, dt) else ""  # tensor cores
                gv = self._func((f"qgemv{bits}{tc}g{group}_{odt}", K, N, dt), lambda: qgemv(K, N, group, bits, dt, odt, mma=bool(tc)))
                return relax.call_tir(gv, list(call.args[1].fields), call.ty)
        if self.an is not None and self._kind(call) == ("matmul", "projection"):
            a = call.args[1].fields[0]
            norm = self.an.bound(a)
            if self.use_gemv and _is_op(norm, "relax.nn.rms_norm") and self.an.single_use(a):
                hit = self._gemv(call)
                if hit is not None:
                    x, g = norm.args[0], norm.args[1]
                    _, w, K, N = hit
                    dt = _dtype(w)
                    if _dtype(x) == dt and _dtype(g) == dt and [int(ax) for ax in norm.attrs.axes] in ([-1], [2]):
                        eps = float(norm.attrs.epsilon)
                        gv = self._func(("rmsnorm_gemv", K, N, dt, eps), lambda: rmsnorm_gemv(K, N, dt, eps))
                        return relax.call_tir(gv, [x, g, w], relax.TensorType((1, 1, N), dt))
            hit = self._gemm(call) if self.use_gemm else None
            if hit is not None:
                a, w, K, N, rows = hit
                dt = _dtype(w)
                if rows:
                    gv = self._func(("gemm_rows", K, N, dt), lambda: gemm_rows(K, N, dt, wgmma=self.wgmma))
                else:
                    gv = self._func(("gemm", K, N, dt), lambda: gemm(K, N, dt, wgmma=self.wgmma))
                return relax.call_tir(gv, [a, w], call.ty)
        if self.use_gemm and self.an is not None:
            hit = self._rows_op(call)
            if hit is not None:
                return hit
        if self.use_gemm and self._kind(call) == ("matmul", "lm_head"):
            hit = self._gemm(call, role="lm_head", out="float32")
            if hit is not None:  # fp32 logits straight from the accumulator
                a, w, K, N, rows = hit
                dt = _dtype(w)
                gv = self._func(("gemm_rows_f32", K, N, dt), lambda: gemm_rows(K, N, dt, out_dtype="float32", wgmma=self.wgmma))
                if rows:  # decode_batch's [B, 1, K]
                    return relax.call_tir(gv, [a, w], call.ty)
                return self._prompt_rows(gv, a, [w], K, N, "float32")  # a prompt's chosen rows [1, n, K] (n: usually one per sequence)
        return call

    def _rows_op(self, call):
        """relax.nn.rms_norm over the last axis, or silu(split(h)[0]) * split(h)[1], on symbolic rows
        ([1, s, K] / [B, 1, K], 16-bit) -> the kiln_rmsnorm_rows / kiln_silu_mul_rows call, or None."""
        shape = call.ty.shape.values if isinstance(call.ty, relax.TensorType) and call.ty.shape is not None else None
        if shape is None or len(shape) != 3 or _static_shape(call) is not None or not (_is_one(shape[0]) or _is_one(shape[1])):
            return None  # (an MoE layer's [tokens, k, F] SwiGLU stays for CudaExperts to fuse)
        try:
            K = int(shape[2])
        except TypeError:
            return None
        dt = str(call.ty.dtype)
        if not rows_supported(K, dt):
            return None
        if _is_op(call, "relax.nn.rms_norm"):
            x, g = call.args[0], call.args[1]
            if [int(ax) for ax in call.attrs.axes] not in ([-1], [2]) or _dtype(x) != dt or _dtype(g) != dt or _static_shape(g) != (K,):
                return None
            eps = float(call.attrs.epsilon)
            gv = self._func(("rmsnorm_rows", K, K, dt, eps), lambda: rmsnorm_rows(K, dt, eps))
            return relax.call_tir(gv, [x, g], call.ty)
        if _is_op(call, "relax.multiply"):
            silu = self.an.bound(call.args[0])
            if not _is_op(silu, "relax.nn.silu"):
                return None
            g, u = self.an.bound(silu.args[0]), self.an.bound(call.args[1])
            if not (isinstance(g, relax.TupleGetItem) and isinstance(u, relax.TupleGetItem)) or (g.index, u.index) != (0, 1):
                return None
            split = self.an.bound(g.tuple_value) if g.tuple_value.same_as(u.tuple_value) else None
            if not _is_op(split, "relax.split") or int(split.attrs.indices_or_sections) != 2 or int(split.attrs.axis) not in (-1, 2):
                return None
            h = split.args[0]
            if _dtype(h) != dt:
                return None
            gv = self._func(("silu_mul_rows", 2 * K, K, dt), lambda: silu_mul_rows(K, dt))
            return relax.call_tir(gv, [h, h], call.ty)
        return None

    def run(self):
        return rewrite_functions(self)


@_t.tvm.transform.module_pass(opt_level=0, name="kiln.CudaProjections")
class CudaProjections:
    """See the module docstring. CUDA targets only (the pipeline decides).
    gemm=False keeps prefill projections on dlight's Matmul (a diagnostic); wgmma=True (an
    artifact built for sm_90 alone) puts them on the Hopper GEMM (kernels/cuda/gemm_wg.cuh)."""

    def __init__(self, gemm: bool = True, gemv: bool = True, qgemv: str = "4,4k,f8", wgmma: bool = False, qgemv_mma: bool = True,
                 fp8_act: bool = True):
        self.gemm, self.gemv, self.qgemv, self.wgmma, self.qgemv_mma, self.fp8_act = gemm, gemv, qgemv, wgmma, qgemv_mma, fp8_act

    def transform_module(self, mod, _ctx):
        return _Rewriter(mod, gemm=self.gemm, gemv=self.gemv, qgemv=self.qgemv, wgmma=self.wgmma, qgemv_mma=self.qgemv_mma,
                         fp8_act=self.fp8_act).run()


__all__ = ["CudaProjections"]
