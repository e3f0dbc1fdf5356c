"""FuseGemmEpilogues: the bias add, residual add and ReLU after a packed C GEMM or in-place
convolution (kernels/cpu/sgemm.c) happen in the kernel's store, on each finished tile while it is in
L1 -- CPU graphs (compiler/onnx_build.py), after ReadConvPatchesInPlace.

    y = kiln_sgemm(x, P)  /  kiln_sconv(x, P)        # [M, N] / [B, OH, OW, N]
    v = view of y (aliases, reshapes)                 # [..., N]: channels last
    z = relu?(v + bias (+ r))                         # bias [1, ..., 1, N], r of z's shape
  =>
    z = reshape(kiln_sgemm_ep(x, P, reshape(bias, [N]) (, reshape(r, y's shape))), z's shape)

Each intermediate must have one use (nothing else reads the GEMM's raw output); the residual add is
taken by the first chain that reaches it (ResNet's downsample block: both branches end in it), the
other branch keeps its bias. Without a bias nothing is fused. Why: ResNet-50 ran ~2.4 ms of
separate bias / residual / ReLU passes over the convolutions' outputs, each a read and write of
the whole tensor (benchmarks/NOTES.md, Session 21).
"""

from __future__ import annotations

from ..tvm_compat import compiler
from .kernels.sgemm_cpu import EP_BIAS, EP_RELU, EP_RES, PACKED_CONV_ATTR, PACKED_GEMM_ATTR, sconv_packed, sgemm_packed
from .relax_mutation import bindings, count_uses, drop_unreferenced, func_attr


def _plans(t, mod, func) -> dict:
    """{the chain's last call (add / relu): (gemm call, bias, residual or None, ep)}."""
    relax = t.relax
    op = lambda name: t.tvm.ir.Op.get(name)  # noqa: E731
    call_tir, reshape, add, relu = op("relax.call_tir"), op("relax.reshape"), op("relax.add"), op("relax.nn.relu")
    bound, uses = bindings(func), count_uses(func)
    user: dict = {}  # var -> the one binding var reading it (for vars read once)
    for v, value in bound.items():
        reads = [value] if isinstance(value, relax.Var) else [a for a in getattr(value, "args", []) if isinstance(a, relax.Var)]
        for a in reads:
            user.setdefault(a, []).append(v)

    def only_user(v):
        u = user.get(v, [])
        return u[0] if len(u) == 1 and uses.get(v, 0) == 1 else None

    def static(ty):
        try:
            return [int(d) for d in ty.shape.values]
        except (TypeError, AttributeError):
            return None

    plans, claimed = {}, set()
    for v, value in bound.items():
        if not (isinstance(value, relax.Call) and value.op.same_as(call_tir)):
            continue
        callee = mod[value.args[0]]
        if not isinstance(callee, t.tirx.PrimFunc):
            continue
        gemm, conv = func_attr(callee, PACKED_GEMM_ATTR), func_attr(callee, PACKED_CONV_ATTR)
        if not ((gemm is not None and int(gemm[2]) == 0) or (conv is not None and int(conv["ep"]) == 0)):
            continue
        n = int(gemm[1]) if gemm is not None else int(conv["N"])
        cur = v
        while (u := only_user(cur)) is not None and (isinstance(bound[u], relax.Var) or (isinstance(bound[u], relax.Call) and bound[u].op.same_as(reshape))):
            cur = u
        u = only_user(cur)
        if u is None or not (isinstance(bound[u], relax.Call) and bound[u].op.same_as(add)):
            continue
        a, b = bound[u].args
        bias = b if a.same_as(cur) else a
        shape, bshape = static(cur.ty), static(bias.ty) if isinstance(bias.ty, relax.TensorType) else None
        if (shape is None or bshape is None or shape[-1] != n or static(u.ty) != shape or bshape[-1:] != [n] or any(d != 1 for d in bshape[:-1])
                or str(bias.ty.dtype) != "float32"):
            continue
        ep, res, end = EP_BIAS, None, u
        r_user = only_user(end)
        if r_user is not None and r_user not in claimed and isinstance(bound[r_user], relax.Call) and bound[r_user].op.same_as(add):
            a, b = bound[r_user].args
            r = b if a.same_as(end) else a
            if not r.same_as(end) and isinstance(r.ty, relax.TensorType) and static(r.ty) == shape and str(r.ty.dtype) == "float32":
                ep, res, end = ep | EP_RES, r, r_user
                claimed.add(r_user)
        r_user = only_user(end)
        if r_user is not None and isinstance(bound[r_user], relax.Call) and bound[r_user].op.same_as(relu):
            ep, end = ep | EP_RELU, r_user
        plans[bound[end]] = (value, bias, res, ep)
    return plans


def _mutator_class():
    t = compiler()
    relax = t.relax

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod, self.plans, self.kernels = mod, {}, {}

        def visit_call_(self, call):
            plan = self.plans.get(call)
            if plan is None:
                return super().visit_call_(call)
            gemm, bias, res, ep = plan
            callee = self.mod[gemm.args[0]]
            g, c = func_attr(callee, PACKED_GEMM_ATTR), func_attr(callee, PACKED_CONV_ATTR)
            if g is not None:
                k, n = int(g[0]), int(g[1])
                key, make, name = ("gemm", k, n, ep), (lambda: sgemm_packed(k, n, ep)), f"kiln_sgemm_f32p16_{n}x{k}_ep{ep}"
            else:
                geom = {kk: int(vv) for kk, vv in c.items() if kk not in ("N", "ep")}
                n = int(c["N"])
                key = ("conv", tuple(sorted(geom.items())), n, ep)
                make = lambda: sconv_packed(geom, n, ep)  # noqa: E731
                name = f"kiln_sconv_{n}x{geom['KH']}x{geom['KW']}x{geom['C']}_{geom['H']}x{geom['W']}_s{geom['sh']}_ep{ep}"
            if key not in self.kernels:
                self.kernels[key] = self.builder_.add_func(make().with_attr("global_symbol", name), name)
            bb = self.builder_
            args = [self.visit_expr(a) for a in gemm.args[1].fields]
            args.append(bb.emit(relax.op.reshape(self.visit_expr(bias), [n])))
            out = list(gemm.ty.shape.values)
            if res is not None:
                args.append(bb.emit(relax.op.reshape(self.visit_expr(res), out)))
            y = bb.emit(relax.call_tir(self.kernels[key], args, relax.TensorType(out, "float32")))
            return relax.op.reshape(y, list(call.ty.shape.values))

    return _Rewrite


class FuseGemmEpilogues:
    """Module pass over every Relax function (CPU graphs: compiler/onnx_build.py)."""

    def __call__(self, mod):
        t = compiler()
        rw = _mutator_class()(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, t.relax.Function):
                rw.plans = _plans(t, mod, func)
                if rw.plans:
                    rw.builder_.update_func(gv, t.relax.analysis.remove_all_unused(rw.visit_expr(func)))
        return drop_unreferenced(drop_unreferenced(rw.builder_.get(), PACKED_GEMM_ATTR), PACKED_CONV_ATTR)


__all__ = ["FuseGemmEpilogues"]
