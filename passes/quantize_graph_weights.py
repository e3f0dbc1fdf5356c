"""QuantizeGraphWeights: `--quant FMT` for ONNX graphs (issue 18) -- the float params that
only ever feed matmuls as their weight become a weight format's arrays, and those matmuls
become the same quantized TE kernel the language models use.

    main(*inputs, ..., P [shape], ...)                 P a float32 param
    B = permute_dims(reshape(P, ...))  (any chain of static reshapes / permute_dims, or none)
    y = matmul(x [..., K], B [K, N])
  =>
    main(*inputs, ..., P.q [N, K], P.s [N, K / g], ...)    (P's place; W = B^T, quantized once at compile time)
    y = NT_qmatmul(x [A, S, K], P.q, P.s) -> [A, S, N]   (x viewed 3-D, y viewed back)

What it covers: ONNX MatMul (kiln's importer stores a MatMul-only weight transposed: a
permute_dims chain), Gemm (transB or not) and, after ConvAsGemm, every one-group 2-D
convolution (reshape of the OIHW weight to [O, C KH KW], then permute_dims). A param with any
other use (an embedding table read by `take`, a bias, a weight also read elementwise) stays
float, as do rows the format cannot group (fmt.fits(K)), non-float32 weights and matrices
the caller's `takes(K, group, rows)` refuses (the CPU driver, compiler/onnx_build.py: those
kiln's integer-dot kernel does not take -- on the dequantizing GEMM the tiny test CNN's K = 72
convolution ran 13x slower than in float -- and those of many rows: QDOT_MAX_ROWS).

Why the kernel of the language models: the call carries OP_ATTR "qmatmul" / ROLE_ATTR
"projection" / QFORMAT_ATTR, so on CPU targets CpuQuantMatmul (passes/cpu_projections.py)
puts it on the integer-dot kernels (kernels/cpu/qdot.c: int8 activations per 32 values,
integer dot products) where the format and shape fit, and the CPU schedules (the dequantize
inlined into the GEMM's packing) take the rest. x is viewed [1, M, K] because those kernels
read rows as [A, S, K].

Quantizing is data work at conversion time (CONVENTIONS: "weight layout work happens once
at conversion time"): `quantize(mod, params)` returns the new module and the new param
list, whose loaders quantize each matrix once, when the weights file is written.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..errors import CompileError
from ..frontends.models.layers import OP_ATTR, QFORMAT_ATTR, ROLE_ATTR, qmatmul_compute
from ..frontends.onnx import Initializer
from ..tvm_compat import compiler
from .relax_mutation import bindings, count_uses, through_views


@dataclass(frozen=True)
class _Chain:
    """How the matmul's B [K, N] is made from the param: static reshapes / permute_dims."""

    steps: tuple  # (("reshape", shape) | ("permute", axes | None), ...)

    def nk(self, w: np.ndarray) -> np.ndarray:
        """The param's array -> W [N, K] (B transposed), contiguous."""
        for kind, arg in self.steps:
            w = w.reshape(arg) if kind == "reshape" else np.transpose(w, arg)
        if w.ndim != 2:
            raise CompileError(f"QuantizeGraphWeights: a weight chain ended in rank {w.ndim}")
        return np.ascontiguousarray(w.T)


class QuantizeGraphWeights:
    """See the module docstring. `fmt`: a passes/quant WeightFormat; `num_inputs`: the
    graph's inputs, which come before the params in main's signature."""

    def __init__(self, fmt, num_inputs: int, takes=None):
        self.fmt = fmt
        self.num_inputs = num_inputs
        self.takes = takes or (lambda k, group, rows: True)  # (K, group, fewest rows of x or None) -> quantize this matrix

    def __call__(self, mod, params: list[Initializer]) -> tuple[object, list[Initializer], list[dict]]:
        """(module, params) -> (module, params, one manifest entry per param) with the
        matrices the format takes quantized. The weights are not read here."""
        t = compiler()
        relax = t.relax
        func = mod["main"]
        pvars = list(func.params[self.num_inputs:])
        if len(pvars) != len(params):
            raise CompileError(f"QuantizeGraphWeights: main takes {len(pvars)} params, the graph has {len(params)}")
        plan, calls = self._plan(t, func, dict(zip(pvars, params)))
        if not plan:
            return mod, params, [_entry(p, "none") for p in params]
        new_params, entries, new_vars, parts_of = [], [], list(func.params[:self.num_inputs]), {}
        for var, p in zip(pvars, params):
            if var not in plan:
                new_params.append(p)
                entries.append(_entry(p, "none"))
                new_vars.append(var)
                continue
            chain, k, n = plan[var]
            group = self.fmt.group_for(k)
            quantized = _quantizer(self.fmt, chain, p.load)
            parts = {}
            for sfx, (shape, dtype) in self.fmt.parts((n, k)).items():
                name = f"{p.name}.{sfx}"
                new_params.append(Initializer(name, dtype, tuple(shape), functools.partial(lambda s, q: q()[s], sfx, quantized)))
                entries.append({"name": name, "shape": list(shape), "dtype": dtype, "source_shape": list(p.shape),
                                **({"quant": "none", "layout": self.fmt.name} if hasattr(self.fmt, "graph_kernel")
                                   else {"quant": self.fmt.name, "group": group})})
                parts[sfx] = relax.Var(_var_name(name), relax.TensorType(list(shape), dtype))
                new_vars.append(parts[sfx])
            parts_of[var] = (parts, n, group)
        rw = _rewriter(t)(mod, self.fmt, {c: parts_of[v] for c, v in calls.items() if v in plan})
        body = rw.visit_expr(func)
        # the chains from the float params are dead now: dropped while those params are still declared
        body = relax.analysis.remove_all_unused(relax.Function(new_vars + list(plan), body.body, func.ret_ty, func.is_pure, func.attrs))
        new_func = relax.Function(new_vars, body.body, func.ret_ty, func.is_pure, func.attrs)
        rw.builder_.update_func(mod.get_global_var("main"), new_func)
        return rw.builder_.get(), new_params, entries

    def _plan(self, t, func, params: dict) -> tuple[dict, dict]:
        """({param var: (chain, K, N)} for the params whose every use is a chain into matmuls' B,
        {matmul call: its param var} for the matmuls reading them)."""
        relax = t.relax
        bound = bindings(func)
        uses = count_uses(func)
        matmul = t.tvm.ir.Op.get("relax.matmul")
        found: dict = {}  # param var -> [(chain, K, N, chain vars)]
        calls: dict = {}  # matmul call -> param var
        bad: set = set()
        for value in bound.values():
            if not (isinstance(value, relax.Call) and value.op.same_as(matmul)):
                continue
            x, b = value.args
            *through, v = through_views(b, bound, params)
            steps = [_step(t, bound[c]) for c in through]
            if v not in params or None in steps:
                continue
            p = params[v]
            shape = tuple(int(d) for d in p.shape)
            try:
                bk = _apply_shape(shape, reversed(steps))
            except ValueError:
                bad.add(v)
                continue
            xt = x.ty if isinstance(x.ty, relax.TensorType) else None
            if (len(bk) != 2 or p.dtype != "float32" or xt is None or xt.shape is None or xt.ndim < 2 or str(xt.dtype) != "float32"
                    or str(value.ty.dtype) != "float32" or not _static_int(xt.shape.values[-1], bk[0])):
                bad.add(v)
                continue
            if not self.fmt.fits(bk[0]) or not self.takes(bk[0], self.fmt.group_for(bk[0]), _fewest(t, xt.shape.values[:-1])):
                bad.add(v)
                continue
            found.setdefault(v, []).append((_Chain(tuple(reversed(steps))), bk[0], bk[1], through))
            calls[value] = v
        plan = {}
        for v, hits in found.items():
            chain, k, n, _ = hits[0]
            if v in bad or any(h[0] != chain for h in hits):
                continue
            # every reference to the param or a var of its chains is a chain step or a matmul's B
            expected: dict = {}
            steps = {cv: (h[3][i + 1] if i + 1 < len(h[3]) else v) for h in hits for i, cv in enumerate(h[3])}
            for arg in steps.values():  # each chain binding reads its argument once
                expected[arg] = expected.get(arg, 0) + 1
            for h in hits:  # each matmul reads its B once
                b = h[3][0] if h[3] else v
                expected[b] = expected.get(b, 0) + 1
            if all(uses.get(var, 0) == cnt for var, cnt in expected.items()):
                plan[v] = (chain, k, n)
        return plan, calls


def _quantizer(fmt, chain: _Chain, load):
    """A loader of the format's arrays for one param, quantizing once on first use."""

    @functools.lru_cache(maxsize=1)
    def parts():
        w = chain.nk(np.asarray(load(), dtype=np.float32))
        return fmt.quantize(w)

    return parts


def _entry(p: Initializer, quant: str) -> dict:
    return {"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "quant": quant}


def _var_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _static_int(expr, value: int) -> bool:
    try:
        return int(expr) == value
    except TypeError:
        return False


def _step(t, call):
    """A static reshape or permute_dims -> ("reshape", shape) | ("permute", axes | None); else None."""
    name = str(call.op.name)
    if name == "relax.permute_dims":
        axes = call.attrs.axes
        return ("permute", None if axes is None else tuple(int(a) for a in axes))
    shape = call.args[1]
    if not isinstance(shape, t.relax.ShapeExpr):
        return None
    try:
        return ("reshape", tuple(int(d) for d in shape.values))
    except TypeError:
        return None


def _apply_shape(shape: tuple[int, ...], steps) -> tuple[int, ...]:
    for kind, arg in steps:
        if kind == "reshape":
            if int(np.prod(arg)) != int(np.prod(shape)) or any(d < 0 for d in arg):
                raise ValueError("reshape")
            shape = tuple(arg)
        else:
            axes = tuple(reversed(range(len(shape)))) if arg is None else arg
            if sorted(axes) != list(range(len(shape))):
                raise ValueError("permute")
            shape = tuple(shape[a] for a in axes)
    return shape


def _rewriter(t):
    relax = t.relax

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def __init__(self, mod, fmt, calls):
            super().__init__(mod)
            self.fmt, self.calls = fmt, calls  # calls: {original matmul call: (its param's parts, N, group)}
            self.kernels: dict = {}

        def visit_call_(self, call):
            hit = self.calls.get(call)
            call = super().visit_call_(call)
            if hit is None:
                return call
            parts, n, group = hit
            x = call.args[0]
            lead = list(x.ty.shape.values[:-1])
            k = int(x.ty.shape.values[-1])
            bb = self.builder_
            if hasattr(self.fmt, "graph_kernel"):  # a format with its own callee (PackedPanels): x viewed [M, K]
                x2 = x if len(lead) == 1 else bb.emit(relax.op.reshape(x, [_prod(lead), k]))
                y = bb.emit(relax.call_tir(self._own_kernel(k, n), [x2, *parts.values()], relax.TensorType([_prod(lead), n], "float32")))
                return y if len(lead) == 1 else relax.op.reshape(y, [*lead, n])
            rows = lead if len(lead) == 2 else [1, _prod(lead)]
            x3 = x if len(lead) == 2 else bb.emit(relax.op.reshape(x, [*rows, k]))
            y = bb.emit(relax.call_tir(self._kernel(k, n, group, [str(parts[s].ty.dtype) for s in parts]),
                                       [x3, *parts.values()], relax.TensorType([*rows, n], "float32")))
            return y if len(lead) == 2 else relax.op.reshape(y, [*lead, n])

        def _own_kernel(self, k: int, n: int):
            if (k, n) not in self.kernels:
                name = f"kiln_sgemm_{self.fmt.name}_{n}x{k}"
                self.kernels[(k, n)] = self.builder_.add_func(self.fmt.graph_kernel(k, n).with_attr("global_symbol", name), name)
            return self.kernels[(k, n)]

        def _kernel(self, k: int, n: int, group: int, dtypes: list[str]):
            """The NT_qmatmul PrimFunc for x [a, s, k] (a, s its own symbols: the caller's row
            count may be any expression) and W [n, k] in the format's arrays."""
            key = (k, n, group)
            if key not in self.kernels:
                te, tirx = t.tvm.te, t.tirx
                x = te.placeholder((tirx.Var("a", "int64"), tirx.Var("s", "int64"), k), "float32", name="x")
                arrays = [te.placeholder(tuple(shape), dt, name=sfx)
                          for (sfx, (shape, _)), dt in zip(self.fmt.parts((n, k)).items(), dtypes)]
                y = qmatmul_compute(self.fmt, group, n)(x, *arrays)
                name = f"NT_qmatmul_{self.fmt.name}_{n}x{k}"
                func = te.create_prim_func([x, *arrays, y]).with_attrs(
                    {OP_ATTR: "qmatmul", ROLE_ATTR: "projection", QFORMAT_ATTR: self.fmt.name, "global_symbol": name})
                self.kernels[key] = self.builder_.add_func(func, name)
            return self.kernels[key]

    return _Rewrite


def _fewest(t, dims) -> int | None:
    """The product of `dims` with every symbol at 1 (the fewest rows a call can have); None
    when an expression is beyond + - * // % min max."""
    tirx = t.tirx

    def ev(e):
        if isinstance(e, tirx.IntImm):
            return int(e)
        if isinstance(e, tirx.Var):
            return 1
        ops = {tirx.Add: lambda a, b: a + b, tirx.Sub: lambda a, b: a - b, tirx.Mul: lambda a, b: a * b,
               tirx.FloorDiv: lambda a, b: a // b, tirx.FloorMod: lambda a, b: a % b, tirx.Max: max, tirx.Min: min}
        for cls, fn in ops.items():
            if isinstance(e, cls):
                a, b = ev(e.a), ev(e.b)
                return None if a is None or b is None or (b == 0 and cls in (tirx.FloorDiv, tirx.FloorMod)) else fn(a, b)
        return None

    out = 1
    for d in dims:
        v = ev(d)
        if v is None:
            return None
        out *= v
    return out


def _prod(dims):
    out = dims[0]
    for d in dims[1:]:
        out = out * d
    return out


__all__ = ["QuantizeGraphWeights"]
