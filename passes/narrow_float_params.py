"""NarrowFloatParams: after Relax's ToMixedPrecision (`kiln compile model.onnx --dtype float16`),
a float32 param whose every use is `astype(P, "float16")` becomes a float16 param, so the
weights are stored -- and read on every call -- in half the bytes, instead of being cast on
every call.

    main(*inputs, ..., P: f32, ...)   a = astype(P, "float16")               ... uses of a
                                      (or a = astype(permute_dims(P), ...): a MatMul weight)
  =>
    main(*inputs, ..., P: f16, ...)   ... uses of P (or of permute_dims(P), now float16)

`__call__(mod, num_inputs)` returns the module and the names (main's param names, in order)
of the params it narrowed; the caller converts those arrays when it writes the weights.
"""

from __future__ import annotations

from ..tvm_compat import compiler
from .relax_mutation import bindings, count_uses, through_views


class NarrowFloatParams:
    def __init__(self, dtype: str = "float16"):
        self.dtype = dtype

    def __call__(self, mod, num_inputs: int) -> tuple[object, list[int]]:
        t = compiler()
        relax = t.relax
        func = mod["main"]
        astype = t.tvm.ir.Op.get("relax.astype")
        params = list(func.params[num_inputs:])
        bound = bindings(func)
        uses = count_uses(func)
        param_set = set(params)
        casts: dict = {}  # param var -> [binding vars of astype(view of P, dtype)]
        for var, v in bound.items():
            if not (isinstance(v, relax.Call) and v.op.same_as(astype) and str(v.attrs.dtype) == self.dtype):
                continue
            path = through_views(v.args[0], bound, param_set)  # the importer's permute_dims of a MatMul weight, each view read once
            if path[-1] in param_set and all(uses.get(c, 0) == 1 for c in path[:-1]):
                casts.setdefault(path[-1], []).append(var)
        narrow = [i for i, p in enumerate(params)
                  if p in casts and str(p.ty.dtype) == "float32" and uses.get(p, 0) == len(casts[p])]
        if not narrow:
            return mod, []
        new = {params[i]: relax.Var(params[i].name, relax.TensorType(params[i].ty.shape, self.dtype)) for i in narrow}
        drop = {cv: bound[cv].args[0] for p, cvs in casts.items() if p in new for cv in cvs}  # cast var -> what it cast
        body = _rewriter(t)(new, drop).visit_expr(func)
        new_params = list(func.params[:num_inputs]) + [new.get(p, p) for p in params]
        out = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
        out["main"] = relax.Function(new_params, body.body, func.ret_ty, func.is_pure, func.attrs)
        return out, narrow


def _rewriter(t):
    relax = t.relax

    @relax.expr_functor.mutator
    class _Drop(relax.PyExprMutator):
        """The params retyped (the views after them re-infer their dtype); each cast's binding
        dropped, its var reading what it cast."""

        def __init__(self, params, drop):
            super().__init__()
            self.params, self.drop, self.done = params, drop, {}

        def visit_var_binding_(self, binding):
            if binding.var in self.drop:
                self.done[binding.var] = self.visit_expr(self.drop[binding.var])
                return
            super().visit_var_binding_(binding)

        def _var(self, var):
            if var in self.params:
                return self.params[var]
            if var in self.done:
                return self.done[var]
            return None

        def visit_var_(self, var):
            got = self._var(var)
            return super().visit_var_(var) if got is None else got

        def visit_dataflow_var_(self, var):
            got = self._var(var)
            return super().visit_dataflow_var_(var) if got is None else got

    return _Drop
