"""CUDA experts: kiln's mixture-of-experts kernels in place of the TE kernels of
frontends/models/moe.py (which the CPU target schedules with CpuExpertGemv, and
dlight's generic rules would schedule here: one expert row per block and a
single-block O(E^2) top-k, 34 + 21 us per layer of Qwen3-30B-A3B on the H200).

Matched by the attributes the model sets (moe.py: OP_ATTR "topk_experts",
"routing_weights", "expert_matmul", "expert_down"), on the Relax graph before
legalization; expert stacks float in the compute dtype or quantized (q4 / q8 /
fp8, QFORMAT_ATTR on both kernels):

    ids = topk_experts(lg); w = routing_weights(lg, ids)    => ids, w = kiln_topk_softmax(lg)
    h = expert_matmul(x, W1, ids); g, u = split(h, 2)
    y = expert_down(silu(g) * u, W2, ids, w)
      one token per sequence (decode, decode_batch)       => a = kiln_[q]expert_gate_up_silu(x, W1, ids)
                                                              y = kiln_[q]expert_down(a, W2, ids, w[, r])
      a prompt (x = reshape([1, s, D]))                    => route, gather, kiln_expert_[q]gemm per matrix
                                                              over all experts, SiLU * up, kiln_expert_combine
    r + reshape(y) after a decode GEMV                     => the residual in the down GEMV's epilogue

The replaced bindings are left dead for DeadCodeElimination. fp32 prompts keep
the TE kernels (the tensor-core tiles are 16-bit).
"""

from __future__ import annotations

import dataclasses

from .cuda_projections import _Analysis, _dtype, _is_op, _static_shape, swiglu_input
from .quant import WEIGHT_FORMATS
from .relax_mutation import rewrite_functions
from .kernels.moe_cuda import (expert_combine, expert_down, expert_gate_up_silu, expert_gemm, expert_qgemm, expert_route, experts_supported,
                               grouped_q_supported, grouped_supported, q_experts_supported, qexpert_down, qexpert_gate_up_silu, topk_softmax, topk_supported)
from ..frontends.models.layers import OP_ATTR, QFORMAT_ATTR
from ..frontends.models.moe import RENORMALIZE_ATTR
from ..tvm_compat import compiler

_t = compiler()
relax = _t.relax
tirx = _t.tirx


@dataclasses.dataclass(frozen=True)
class _Experts:
    """One MoE MLP as the graph has it: x [n, D] -> expert_down(silu * up of expert_matmul)."""

    x: object
    w1: tuple  # the gate/up stack [E, 2F, D]: (W,) float, or the quantized kernels' (q, s, z)
    w2: tuple  # the down stack [E, D, F], the same way
    ids: object
    wts: object
    n_exp: int
    f: int
    d: int
    k: int
    dtype: str
    quant: tuple | None = None  # (code kind, group of w1, group of w2) of a quantized pair
    residual: object = None  # r of h = r + reshape(y), folded into the down GEMV


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, wgmma: bool = False):
        super().__init__(mod)
        self.mod_ = mod
        self.wgmma = wgmma
        self.an: _Analysis | None = None
        self.funcs: dict = {}
        self.plan: dict = {}  # original binding var -> how to rewrite it

    def _op(self, value) -> str | None:
        """OP_ATTR of the PrimFunc a call_tir calls, or None."""
        if not _is_op(value, "relax.call_tir"):
            return None
        func = self.mod_[value.args[0]]
        attrs = func.attrs if isinstance(func, tirx.PrimFunc) and func.attrs is not None else {}
        return str(attrs[OP_ATTR]) if OP_ATTR in attrs else None

    def _attrs(self, value):
        return self.mod_[value.args[0]].attrs

    def _func(self, key, make):
        if key not in self.funcs:
            name = "kiln_" + "_".join(str(p) for p in key)
            self.funcs[key] = self.builder_.add_func(make().with_attr("global_symbol", name), name)
        return self.funcs[key]

    # --- planning, over the original bindings ------------------------------------------
    def _plan(self, func):
        self.plan = {}
        for var, value in self.an.value.items():
            kind = self._op(value)
            if kind == "routing_weights":
                lg, ids = value.args[1].fields
                topk = self.an.bound(ids)
                shape = _static_shape(lg)  # [n, E] with n symbolic: the E axis is what matters
                if self._op(topk) != "topk_experts" or not topk.args[1].fields[0].same_as(lg):
                    continue
                n_exp, k = int(lg.ty.shape.values[-1]), int(ids.ty.shape.values[-1])
                if shape is not None and len(shape) != 2 or not topk_supported(n_exp, k):
                    continue
                renorm = bool(int(self._attrs(value)[RENORMALIZE_ATTR]))
                self.plan[ids] = ("topk", lg, n_exp, k, renorm, var)
                self.plan[var] = ("routing", ids)
            elif kind == "expert_down":
                e = self._experts(value)
                if e is None:
                    continue
                if not self._prompt(e.x):
                    self.plan[var] = ("experts", e)
                elif e.quant is None and grouped_supported(e.n_exp, e.d, e.f, e.dtype) or e.quant is not None and all(
                        grouped_q_supported(e.n_exp, kk, g, e.quant[0], e.dtype) for kk, g in ((e.d, e.quant[1]), (e.f, e.quant[2]))):
                    self.plan[var] = ("experts_grouped", e)
        self._plan_residuals()

    def _plan_residuals(self):
        """h = r + reshape(y) after a decode expert GEMV y: the add moves into the down GEMV's
        epilogue (y's binding gets r; the reshape then holds r + y; h becomes that reshape)."""
        users: dict = {}
        order = {var: i for i, var in enumerate(self.an.value)}  # binding order (params: -1, before all)
        for var, value in self.an.value.items():
            if isinstance(value, relax.Call):
                for a in value.args:
                    if isinstance(a, relax.Var):
                        users.setdefault(a, []).append((var, value))
        for y, step in list(self.plan.items()):
            if step[0] != "experts" or len(users.get(y, [])) != 1 or not self.an.single_use(y):
                continue
            (rv, reshape), = users[y]
            if not _is_op(reshape, "relax.reshape") or len(users.get(rv, [])) != 1 or not self.an.single_use(rv):
                continue
            (hv, add), = users[rv]
            if not _is_op(add, "relax.add"):
                continue
            r = add.args[1] if add.args[0].same_as(rv) else add.args[0]
            if _static_shape(r) is None or _static_shape(r) != _static_shape(rv) or _dtype(r) != step[1].dtype:
                continue
            if order.get(r, -1) > order[y]:  # bound after the GEMV (DeepSeek's shared experts): not a residual it can read
                continue
            self.plan[y] = ("experts", dataclasses.replace(step[1], residual=r))
            self.plan[hv] = ("alias", rv)

    def _prompt(self, x) -> bool:
        """x = reshape(h [1, s, D]) with s symbolic: a prompt's tokens (decode has [1, 1, D],
        decode_batch [B, 1, D]: one token per sequence)."""
        r = self.an.bound(x)
        if not _is_op(r, "relax.reshape") or not isinstance(r.args[0].ty, relax.TensorType) or r.args[0].ty.shape is None:
            return False
        dims = r.args[0].ty.shape.values
        return len(dims) == 3 and not (isinstance(dims[1], tirx.IntImm) and int(dims[1]) == 1)

    def _experts(self, down) -> _Experts | None:
        """down = expert_down(silu(g) * u, W2, ids, w) with g, u = split(expert_matmul(x, W1, ids)),
        both stacks float in the compute dtype or both in one quantized format with a CUDA code kind."""
        *a_w2, ids, wts = down.args[1].fields
        a, w2 = a_w2[0], tuple(a_w2[1:])
        h = swiglu_input(self.an, a)
        up = self.an.bound(h) if h is not None else None
        if self._op(up) != "expert_matmul" or not self.an.single_use(h):
            return None
        x, *w1, ids1 = up.args[1].fields
        w1 = tuple(w1)
        if not ids1.same_as(ids) or len(w1) != len(w2):
            return None
        s1, s2 = _static_shape(w1[0]), _static_shape(w2[0])
        if s1 is None or s2 is None or len(s1) != 3 or len(s2) != 3 or len(x.ty.shape.values) != 2:
            return None
        n_exp, dt = s1[0], _dtype(x)
        d, k = int(x.ty.shape.values[-1]), int(ids.ty.shape.values[-1])
        if len(w1) == 1:  # float stacks
            f = s2[2]
            if s1 != (n_exp, 2 * f, d) or s2 != (n_exp, d, f) or {_dtype(w1[0]), _dtype(w2[0]), _dtype(a), str(down.ty.dtype)} != {dt}:
                return None
            if not (experts_supported(d, dt) and experts_supported(f, dt)):
                return None
            return _Experts(x, w1, w2, ids, wts, n_exp, f, d, k, dt)
        fmts = {str(self._attrs(c)[QFORMAT_ATTR]) if QFORMAT_ATTR in self._attrs(c) else None for c in (up, down)}
        fmt = WEIGHT_FORMATS.get(fmts.pop()) if len(fmts) == 1 else None
        if fmt is None or fmt.cuda_code is None or fmt.zero != (len(w1) == 3) or {_dtype(a), str(down.ty.dtype)} != {dt}:
            return None
        f = s1[1] // 2
        g1, g2 = d // _static_shape(w1[1])[2], f // _static_shape(w2[1])[2]
        if s1[1] != 2 * f or s2[:2] != (n_exp, d) or not (q_experts_supported(d, g1, fmt.cuda_code, dt) and
                                                          q_experts_supported(f, g2, fmt.cuda_code, dt)):
            return None
        if not fmt.zero:  # the kernels' one signature (q, s, z): scales stand in for the minima (kernels/moe_cuda._q_arrays)
            w1, w2 = (*w1, w1[1]), (*w2, w2[1])
        return _Experts(x, w1, w2, ids, wts, n_exp, f, d, k, dt, quant=(fmt.cuda_code, g1, g2))

    # --- rewriting ------------------------------------------------------------------------
    def visit_var_binding_(self, binding):
        step = self.plan.get(binding.var)
        if step is None:
            return super().visit_var_binding_(binding)
        remap = self.visit_expr
        if step[0] == "topk":
            _, lg, n_exp, k, renorm, routing_var = step
            gv = self._func(("topk_softmax", n_exp, k, int(renorm)), lambda: topk_softmax(n_exp, k, renorm))
            n = lg.ty.shape.values[0]
            out = [relax.TensorType((n, k), "int32"), relax.TensorType((n, k), "float32")]
            fused = self.builder_.emit(relax.call_tir(gv, [remap(lg)], out), "topk_softmax")
            self.plan[routing_var] = ("routing_done", fused)
            new = self.builder_.emit(relax.TupleGetItem(fused, 0), binding.var.name)
        elif step[0] == "routing_done":
            new = self.builder_.emit(relax.TupleGetItem(step[1], 1), binding.var.name)
        elif step[0] == "alias":  # r + reshape(y) where y already added r
            self.set_var_remap(binding.var, self.visit_expr(step[1]))
            return None
        elif step[0] == "experts":
            new = self._gemv(binding, step[1])
        elif step[0] == "experts_grouped":
            new = self._grouped(binding, step[1])
        else:  # "routing" whose topk did not come first: leave it
            return super().visit_var_binding_(binding)
        self.set_var_remap(binding.var, new)

    def _gemv(self, binding, e: _Experts):
        """One token per sequence: the gate/up GEMV with SiLU * up, then the down GEMV with the
        routing weights, the sum over k and (when planned) the residual."""
        remap, emit = self.visit_expr, self.builder_.emit
        n, res = e.x.ty.shape.values[0], e.residual is not None
        if e.quant is None:
            up = self._func(("expert_gate_up_silu", e.n_exp, e.f, e.d, e.k, e.dtype),
                            lambda: expert_gate_up_silu(e.n_exp, e.f, e.d, e.k, e.dtype))
            down = self._func(("expert_down", e.n_exp, e.d, e.f, e.k, e.dtype, int(res)),
                              lambda: expert_down(e.n_exp, e.d, e.f, e.k, e.dtype, res))
        else:
            code, g1, g2 = e.quant
            up = self._func(("qexpert_gate_up_silu", code, g1, e.n_exp, e.f, e.d, e.k, e.dtype),
                            lambda: qexpert_gate_up_silu(e.n_exp, e.f, e.d, e.k, e.dtype, code, g1))
            down = self._func(("qexpert_down", code, g2, e.n_exp, e.d, e.f, e.k, e.dtype, int(res)),
                              lambda: qexpert_down(e.n_exp, e.d, e.f, e.k, e.dtype, code, g2, res))
        a = emit(relax.call_tir(up, [remap(e.x), *map(remap, e.w1), remap(e.ids)], relax.TensorType((n, e.k, e.f), e.dtype)), "expert_act")
        extra = [emit(relax.op.reshape(remap(e.residual), (n, e.d)))] if res else []
        return emit(relax.call_tir(down, [a, *map(remap, e.w2), remap(e.ids), remap(e.wts), *extra], relax.TensorType((n, e.d), e.dtype)),
                    binding.var.name)

    def _grouped(self, binding, e: _Experts):
        """A prompt: (token, expert) pairs grouped by expert, one tensor-core GEMM launch per
        matrix over all experts, SiLU * up between, the routing weights and the sum over k
        in the un-grouping (fp32)."""
        op, emit, remap = relax.op, self.builder_.emit, self.visit_expr
        x, ids, wts, n_exp, f, d, k, dt = e.x, e.ids, e.wts, e.n_exp, e.f, e.d, e.k, e.dtype
        n = x.ty.shape.values[0]

        def gemm(a, w, N, K, group, name):  # the grouped rows a [m, K] times each expert's [N, K]
            if e.quant is None:
                gv = self._func(("expert_gemm", n_exp, N, K, k, dt), lambda: expert_gemm(n_exp, N, K, k, dt, wgmma=self.wgmma))
            else:
                code = e.quant[0]
                gv = self._func(("expert_qgemm", code, group, n_exp, N, K, k, dt),
                                lambda: expert_qgemm(n_exp, N, K, k, dt, code, group, wgmma=self.wgmma))
            return emit(relax.call_tir(gv, [a, *map(remap, w), offsets], relax.TensorType((m, N), dt)), name)

        m = n * k
        gv = self._func(("expert_route", n_exp, k), lambda: expert_route(n_exp, k))
        i32 = [relax.TensorType((n_exp + 1,), "int32"), relax.TensorType((m,), "int32"), relax.TensorType((m,), "int32")]
        route = emit(relax.call_tir(gv, [remap(ids)], i32), "expert_route")
        offsets, rows, pos = (emit(relax.TupleGetItem(route, i)) for i in range(3))
        xg = emit(op.take(remap(x), rows, axis=0, mode="clip"), "expert_x")  # [m, D] (rows are in bounds: clip, not "fast", which warns)
        groups = e.quant[1:] if e.quant is not None else (0, 0)
        h = gemm(xg, e.w1, 2 * f, d, groups[0], "expert_gate_up")
        gu = emit(op.split(h, 2, axis=-1))
        a = emit(op.multiply(op.nn.silu(relax.TupleGetItem(gu, 0)), relax.TupleGetItem(gu, 1)), "expert_act")
        z = gemm(a, e.w2, d, f, groups[1], "expert_out")  # [m, D] grouped
        gv = self._func(("expert_combine", d, k, dt), lambda: expert_combine(d, k, dt))
        return emit(relax.call_tir(gv, [z, pos, remap(wts)], relax.TensorType((n, d), dt)), binding.var.name)

    def run(self):
        def analyse(func) -> bool:
            self.an = _Analysis(func)
            self._plan(func)
            return bool(self.plan)

        return rewrite_functions(self, self.mod_, analyse)


@_t.tvm.transform.module_pass(opt_level=0, name="kiln.CudaExperts")
class CudaExperts:
    """See the module docstring. CUDA targets only (the pipeline decides). wgmma: an artifact for
    sm_90 alone -- the prompt's expert GEMMs on Hopper's warpgroup MMA."""

    def __init__(self, wgmma: bool = False):
        self.wgmma = wgmma

    def transform_module(self, mod, _ctx):
        return _Rewriter(mod, wgmma=self.wgmma).run()


__all__ = ["CudaExperts"]
