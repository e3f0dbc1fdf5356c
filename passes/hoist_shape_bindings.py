"""HoistShapeBindings: move the bindings a MatchCast needs (and the MatchCast)
as early in their dataflow block as their own inputs allow.

Why: a graph imported from ONNX computes some dimensions from data (a Range
over `Shape(x)[1]` becomes `tensor_to_shape` + `match_cast` defining a new
symbolic var). TVM 0.27's FuseOps places a fused group at its first member's
position without tracking symbolic vars, so a group that uses a var defined by
a later MatchCast ends up before it, and VMShapeLower fails ("range_len_0 ...
has not been computed"; seen on a torch-exported BERT). With every MatchCast
as early as it can be, no group can land before the var it needs.

The order is otherwise kept (a stable topological sort: MatchCasts and their
ancestors first among the bindings ready at each step), so graphs without
MatchCast come out unchanged.
"""

from __future__ import annotations

import heapq

from ..tvm_compat import compiler


def _reorder(block):
    t = compiler()
    relax, analysis = t.relax, t.relax.analysis
    bindings = list(block.bindings)
    index = {b.var: i for i, b in enumerate(bindings)}
    defines = {}  # symbolic var -> the MatchCast binding that defines it
    for i, b in enumerate(bindings):
        if isinstance(b, relax.MatchCast):
            for v in analysis.definable_tir_vars_in_type(b.ty):
                defines.setdefault(v, i)
    deps = []
    for i, b in enumerate(bindings):
        d = {index[v] for v in analysis.free_vars(b.value) if v in index}
        d |= {defines[s] for s in analysis.free_symbolic_vars(b.value) if s in defines}
        d |= {defines[s] for s in analysis.tir_vars_in_type(b.var.ty) if s in defines}
        d.discard(i)
        deps.append(d)
    first = set()  # MatchCasts and everything they depend on
    stack = [i for i, b in enumerate(bindings) if isinstance(b, relax.MatchCast)]
    if not stack:
        return block
    while stack:
        i = stack.pop()
        if i not in first:
            first.add(i)
            stack.extend(deps[i])
    users: list[list[int]] = [[] for _ in bindings]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    ready = [(i not in first, i) for i in range(len(bindings)) if waiting[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (u not in first, u))
    if len(order) != len(bindings):  # a dependency we could not see: leave the block as it was
        return block
    return relax.DataflowBlock([bindings[i] for i in order], block.span)


class HoistShapeBindings:
    """Module pass: every Relax function's dataflow blocks, MatchCasts hoisted."""

    def __call__(self, mod):
        t = compiler()
        relax = t.relax
        for gv, f in list(mod.functions.items()):
            if not isinstance(f, relax.Function) or not isinstance(f.body, relax.SeqExpr):
                continue
            blocks = [_reorder(b) if isinstance(b, relax.DataflowBlock) else b for b in f.body.blocks]
            if all(a.same_as(b) for a, b in zip(blocks, f.body.blocks)):
                continue
            mod[gv] = relax.Function(f.params, relax.SeqExpr(blocks, f.body.body), f.ret_ty, f.is_pure, f.attrs, f.span)
        return mod
