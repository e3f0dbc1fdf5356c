"""SortShapeHeapStores: write the stores of host shape functions in slot order.

Relax's VMShapeLower (run by `default_build_pipeline()`) computes symbolic
shapes in small host PrimFuncs (attr `tirx.is_host_func`) over the VM's shape
heap `H  # [num_slots] int64`:

    H[5] = 400 * H[0]
    H[4] = 800 * H[0]
    H[7] = 4 * H[1] * 211

TVM 0.27 emits those stores in the order of an unordered_map keyed by the
structural hash of expressions over free vars, which changes from run to run,
so two compiles of one model give different `lib/*.so` bytes. This pass sorts
every maximal run of consecutive stores into one buffer at constant indices by
index. It leaves a run alone unless reordering provably cannot change a result:
each store writes a distinct slot, reads only that buffer at constant indices,
never a slot that another store of the run writes, and calls only pure ops.
"""

from __future__ import annotations

from ..tvm_compat import compiler

HOST_FUNC_ATTR = "tirx.is_host_func"


class SortShapeHeapStores:
    """Module pass: sort the shape-heap stores of every host PrimFunc by slot.

    `SortShapeHeapStores()` returns a `tvm.transform.ModulePass` (usable in a
    `Sequential`, or called on an IRModule). It is built on first use, so that
    importing this module does not import TVM.
    """

    def __new__(cls):
        t = compiler()
        return t.tvm.transform.module_pass(sort_shape_heap_stores, opt_level=0, name=cls.__name__)


def sort_shape_heap_stores(mod, _ctx=None):
    """The IRModule with each host PrimFunc's shape-heap stores in slot order."""
    t = compiler()
    changed = {}
    for gv, func in mod.functions.items():
        if isinstance(func, t.tirx.PrimFunc) and _is_host_func(func):
            new_func = sort_stores_in_func(func)
            if not new_func.same_as(func):
                changed[gv] = new_func
    if not changed:
        return mod
    out = mod.clone()
    for gv, func in changed.items():
        out.update_func(gv, func)
    return out


def sort_stores_in_func(func):
    """`func` with every reorderable run of constant-index stores sorted by index."""
    t = compiler()
    import tvm_ffi  # noqa: PLC0415  (compiler() imported the full TVM; 0.27 walks IR through tvm_ffi)

    body = tvm_ffi.structural_map(func.body, (t.tirx.SeqStmt, _sort_seq), order="post")
    return func if body.same_as(func.body) else func.with_body(body)


def _is_host_func(func) -> bool:
    attrs = func.attrs
    return attrs is not None and HOST_FUNC_ATTR in attrs and bool(attrs[HOST_FUNC_ATTR])


def _sort_seq(seq):
    t = compiler()
    out, run = [], []

    def flush():
        if len(run) > 1 and _reorderable(run):
            out.extend(sorted(run, key=_slot))
        else:
            out.extend(run)
        run.clear()

    for stmt in seq.seq:
        store = _slot(stmt) is not None
        if run and not (store and stmt.buffer.same_as(run[0].buffer)):
            flush()
        (run if store else out).append(stmt)
    flush()
    if all(a.same_as(b) for a, b in zip(out, seq.seq)):
        return seq
    return t.tirx.SeqStmt(out, seq.span)


def _slot(stmt) -> int | None:
    """The constant index of a one-index BufferStore, else None."""
    t = compiler()
    if not isinstance(stmt, t.tirx.BufferStore) or len(stmt.indices) != 1:
        return None
    index = stmt.indices[0]
    return int(index.value) if isinstance(index, t.tirx.IntImm) else None


def _reorderable(run) -> bool:
    """True when the stores of `run` give the same results in any order."""
    slots = [_slot(s) for s in run]
    if len(set(slots)) != len(slots):
        return False  # two writes to one slot: the last one wins
    for store, own in zip(run, slots):
        reads = _reads(store.value, run[0].buffer)
        if reads is None or (reads - {own}) & set(slots):
            return False
    return True


def _reads(expr, buffer) -> set[int] | None:
    """Slots of `buffer` that `expr` reads, or None when that cannot be told or
    the expression reads anything else that a reordering could affect (another
    buffer, a computed index, a call with side effects)."""
    t = compiler()
    import tvm_ffi  # noqa: PLC0415

    pure = (t.tirx.CallEffectKind.ExprAnnotation.value, t.tirx.CallEffectKind.Pure.value)
    slots: set[int] = set()
    ok = [True]

    def on_load(load):
        index = load.indices[0] if len(load.indices) == 1 else None
        if load.source.same_as(buffer) and isinstance(index, t.tirx.IntImm):
            slots.add(int(index.value))
        else:
            ok[0] = False

    def on_call(call):
        op = call.op
        effect = op.get_attr("TCallEffectKind") if isinstance(op, t.tvm.ir.Op) else None
        if effect is None or int(effect) not in pure:
            ok[0] = False

    tvm_ffi.structural_walk(expr, [(t.tvm.ir.TensorLoad, on_load), (t.tvm.ir.Call, on_call)])
    return slots if ok[0] else None
