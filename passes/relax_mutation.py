"""Helpers for the passes that rewrite Relax functions with a PyExprMutator (kiln's projection,
expert, convolution, gather and calibration rewrites, the graph weight passes): the loop over a
module's functions, a count of each var's uses, a function's bindings and the walk from a value
back through layout-only views live here once."""

from __future__ import annotations

from collections.abc import Callable

from ..tvm_compat import compiler


def rewrite_functions(mutator, mod, before: Callable | None = None):
    """`mutator` (a relax PyExprMutator built over `mod`) over every Relax function of `mod`;
    `before(func)` runs first (an analysis the mutator reads) and returning False leaves that
    function as it is. Returns the mutator's module: the rewritten functions and any it added
    (kernels); `mod` itself is not changed."""
    relax = compiler().relax
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function) and (before is None or before(func) is not False):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def count_uses(func) -> dict:
    """{var: how many times an expression of `func` reads it} (definitions not counted)."""
    relax = compiler().relax

    @relax.expr_functor.visitor
    class _Uses(relax.PyExprVisitor):
        def __init__(self):
            super().__init__()
            self.uses: dict = {}

        def visit_var_(self, var):
            self.uses[var] = self.uses.get(var, 0) + 1

        def visit_dataflow_var_(self, var):
            self.uses[var] = self.uses.get(var, 0) + 1

    counter = _Uses()
    counter.visit_expr(func)
    return counter.uses


VIEW_OPS = ("relax.permute_dims", "relax.reshape")  # layout-only ops (the importer's transposed MatMul weights)


def bindings(func) -> dict:
    """{var: the value bound to it} for every VarBinding of `func`'s body."""
    relax = compiler().relax
    return {b.var: b.value for block in func.body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)}


def through_views(var, bound: dict, stop) -> list:
    """[var, what its view reads, ...]: back through bindings of VIEW_OPS calls, ending at the
    first var in `stop` or not bound to a view."""
    relax = compiler().relax
    path = [var]
    while path[-1] not in stop and isinstance(bound.get(path[-1]), relax.Call) and str(getattr(bound[path[-1]].op, "name", "")) in VIEW_OPS:
        path.append(bound[path[-1]].args[0])
    return path


def func_attr(func, key: str):
    """A function's attribute `key`, None where it has none."""
    return None if func.attrs is None or key not in func.attrs else func.attrs[key]


def call_tir_attrs(mod, call) -> dict:
    """The attributes of the PrimFunc a relax.call_tir `call` calls (in `mod`); {} for any other call, or none."""
    t = compiler()
    op = getattr(call, "op", None)
    if not isinstance(call, t.relax.Call) or not isinstance(op, t.tvm.ir.Op) or op.name != "relax.call_tir":
        return {}
    func = mod[call.args[0]]
    return dict(func.attrs) if isinstance(func, t.tirx.PrimFunc) and func.attrs is not None else {}


def drop_unreferenced(mod, attr: str):
    """`mod` without the PrimFuncs that carry `attr` and that no Relax function calls any more (the
    kernels a rewrite replaced: they would still be compiled into the library)."""
    t = compiler()
    relax = t.relax
    called: set = set()

    @relax.expr_functor.visitor
    class _Refs(relax.PyExprVisitor):
        def visit_global_var_(self, gv):
            called.add(gv.name_hint)

    for f in mod.functions.values():
        if isinstance(f, relax.Function):
            _Refs().visit_expr(f)
    dead = [gv for gv, f in mod.functions.items()
            if isinstance(f, t.tirx.PrimFunc) and func_attr(f, attr) is not None and gv.name_hint not in called]
    if not dead:
        return mod
    out = t.tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in dead}, attrs=mod.attrs)
    return out
