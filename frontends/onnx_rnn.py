"""ONNX's recurrent operators RNN, GRU and LSTM (TVM 0.27's Relax importer has none of the three).

Relax has no loop, and a symbolic sequence length cannot be unrolled, so each node becomes:

- the input projection for every step and both directions at once, a regular matmul
  `X [T*B, I] x W^T [I, D*G*H]` plus the biases that add outside the recurrence
  (kiln's GEMM schedule takes it like any other matmul);
- one TIR kernel (call_tir) with a serial loop over the steps: per (direction, batch row)
  in parallel, the recurrent product `h_prev x R^T` (R transposed to [D, H, G*H] so the
  inner loop runs along contiguous gates), the gates and the state update. It is
  marked scheduled: the schedule rules leave it as written.

Semantics are ONNX's (layout 0 [T, B, I] and 1 [B, T, I]; directions forward, reverse,
bidirectional; B, initial_h, initial_c, sequence_lens, LSTM peepholes P; GRU's
linear_before_reset both ways). With sequence_lens, row b runs its first lens[b] steps
(reverse: from step lens[b] - 1 down), Y is 0 past them and Y_h / Y_c hold the last
valid state (0 for a row of length 0), as onnxruntime does; a length outside [0, T]
(onnxruntime refuses it) is clamped into it, so the kernel never indexes outside Y.
Refused, one line naming the op: activations other than the defaults (RNN Tanh; GRU
Sigmoid, Tanh; LSTM Sigmoid, Tanh, Tanh), clip, LSTM's input_forget, dtypes other than
float32, weights of unknown shape.

Gate orders (ONNX): GRU [z, r, h], LSTM [i, o, f, c], peepholes [i, o, f].

CPU only: the kernel has no GPU thread bindings. A `--target cuda` build compiles it as host
code (nothing in TVM's path refuses it), so such an artifact must not be run; the kernel
carries the function attribute `kiln.cpu_only` for the build to refuse it by.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import UnsupportedModelError

_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
V = 32  # gate columns accumulated in registers at a time (4 AVX2 / 2 AVX-512 vectors)
PACKED_ATTR = "kiln_packed_r"  # set by frontends/onnx_graph.py on nodes whose R param it stored packed
_DEFAULT_ACTIVATIONS = {"RNN": ("tanh",), "GRU": ("sigmoid", "tanh"), "LSTM": ("sigmoid", "tanh", "tanh")}


def _groups(op: str, H: int) -> list[tuple[int, int]]:
    """The gate columns the recurrent product runs over in one go, (first, count): GRU's h gate
    is separate (its input is r * h_prev, or its sum is multiplied by r)."""
    return [(0, 2 * H), (2 * H, H)] if op == "GRU" else [(0, _GATES[op] * H)]


def _blocks(n: int) -> int:
    return -(-n // V)


def packed_r_shape(op: str, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """R [D, G*H, H] -> pack_r's [D, blocks, H, V]."""
    D, _, H = shape
    return (D, sum(_blocks(n) for _, n in _groups(op, H)), H, V)


def pack_r(op: str, r: np.ndarray) -> np.ndarray:
    """R [D, G*H, H] -> [D, blocks, H, V]: each gate group's columns padded with zeros to a
    multiple of V and cut into blocks of V, so the kernel reads a block's weights for every k
    as one contiguous run (R's transpose [D, H, G*H] is read at a stride of G*H floats: 2x
    slower per step on a 512-wide LSTM). Done once, as data, for R params (onnx_graph.py)."""
    D, _, H = r.shape
    parts = []
    for first, n in _groups(op, H):
        cols = np.zeros((D, _blocks(n) * V, H), r.dtype)
        cols[:, :n] = r[:, first:first + n]
        parts.append(cols.reshape(D, _blocks(n), V, H).transpose(0, 1, 3, 2))
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def _pack_r_relax(relax, op: str, r, D: int, H: int):
    """pack_r as Relax ops, for an R that is not a param (constants fold at compile time)."""
    parts = []
    for first, n in _groups(op, H):
        cols = relax.op.strided_slice(r, axes=[1], begin=[first], end=[first + n])
        if _blocks(n) * V != n:
            cols = relax.op.concat([cols, relax.const(np.zeros((D, _blocks(n) * V - n, H), "float32"))], axis=1)
        parts.append(relax.op.permute_dims(relax.op.reshape(cols, [D, _blocks(n), V, H]), [0, 1, 3, 2]))
    return relax.op.concat(parts, axis=1) if len(parts) > 1 else parts[0]


def _refuse(op: str, what: str, note: str = ""):
    raise UnsupportedModelError(f"{op} with {what}: not supported by kiln's converter{note}")


def _check_attrs(op: str, attrs: dict, num_dirs: int) -> None:
    acts = attrs.get("activations")
    if acts is not None:
        want = _DEFAULT_ACTIVATIONS[op] * num_dirs
        got = tuple(a.decode("ascii").lower() if isinstance(a, bytes) else str(a).lower() for a in acts)
        if got != want:
            _refuse(op, f"activations {list(got)}", f" (only the defaults {list(want)})")
    if attrs.get("clip") is not None:
        _refuse(op, "clip")
    if op == "LSTM" and attrs.get("input_forget", 0):
        _refuse(op, "input_forget=1")
    if attrs.get("layout", 0) not in (0, 1):
        _refuse(op, f"layout={attrs.get('layout')}")


def _static(t, op: str, x, name: str, rank: int) -> list[int]:
    shape = getattr(x.ty, "shape", None) if x is not None else None
    if shape is None or len(shape) != rank or not all(isinstance(v, t.tvm.tirx.IntImm) for v in shape):
        _refuse(op, f"{name} of unknown or symbolic shape")
    return [int(v) for v in shape]


def _convert(op: str):
    def convert(t, bb, inputs, attrs):
        relax = t.relax
        inputs = list(inputs) + [None] * (8 - len(inputs))
        x, w, r, b, lens, h0 = inputs[:6]
        c0, p = inputs[6], inputs[7]
        direction = attrs.get("direction", b"forward")
        direction = direction.decode("ascii") if isinstance(direction, bytes) else str(direction)
        if direction not in ("forward", "reverse", "bidirectional"):
            _refuse(op, f"direction {direction!r}")
        num_dirs = 2 if direction == "bidirectional" else 1
        _check_attrs(op, attrs, num_dirs)
        dtype = str(x.ty.dtype)
        if dtype != "float32":
            _refuse(op, f"dtype {dtype}", " (float32 only)")
        G = _GATES[op]
        D, GH, I = _static(t, op, w, "W", 3)
        packed = bool(attrs.get(PACKED_ATTR, 0))
        r_shape = _static(t, op, r, "R", 4 if packed else 3)
        H = r_shape[2]  # [D, G*H, H], packed [D, blocks, H, V]
        want_r = list(packed_r_shape(op, (D, GH, H))) if packed else [D, GH, H]
        if D != num_dirs or GH != G * H or r_shape != want_r or attrs.get("hidden_size", H) != H:
            _refuse(op, f"W {[D, GH, I]}, R {r_shape}, direction {direction}, hidden_size {attrs.get('hidden_size')}", " (they disagree)")
        if len(x.ty.shape) != 3 or not isinstance(x.ty.shape[2], t.tvm.tirx.IntImm) or int(x.ty.shape[2]) != I:
            _refuse(op, f"X {x.ty}", f" (W takes input size {I})")
        layout = attrs.get("layout", 0)
        if layout == 1:
            x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))  # [B, T, I] -> [T, B, I]
            h0 = bb.emit(relax.op.permute_dims(h0, [1, 0, 2])) if h0 is not None else None  # [B, D, H] -> [D, B, H]
            c0 = bb.emit(relax.op.permute_dims(c0, [1, 0, 2])) if c0 is not None else None
        steps, batch = x.ty.shape[0], x.ty.shape[1]

        # the input projection of every step: [T, B, D, G*H], with the biases that add outside the recurrence
        w2 = relax.op.reshape(w, [D * GH, I])
        xw = bb.emit(relax.op.matmul(relax.op.reshape(x, [steps * batch, I]), relax.op.permute_dims(w2, [1, 0])), name_hint=f"{op.lower()}_xw")
        lbr = op == "GRU" and attrs.get("linear_before_reset", 0) != 0
        rbh = None
        if b is not None:
            if _static(t, op, b, "B", 2) != [D, 2 * GH]:
                _refuse(op, f"B {b.ty}", f" (expected [{D}, {2 * GH}])")
            wb = relax.op.strided_slice(b, axes=[1], begin=[0], end=[GH])
            rb = relax.op.strided_slice(b, axes=[1], begin=[GH], end=[2 * GH])
            if lbr:  # GRU's h-gate recurrent bias is multiplied by r: it stays in the kernel
                rbh = bb.emit(relax.op.strided_slice(b, axes=[1], begin=[GH + 2 * H], end=[2 * GH]))
                rb = relax.op.multiply(rb, relax.const(np.repeat(np.array([1, 1, 0], "float32"), H)))
            xw = bb.emit(relax.op.add(xw, relax.op.reshape(relax.op.add(wb, rb), [D * GH])))
        xw = bb.emit(relax.op.reshape(xw, [steps, batch, D, GH]))
        if lbr and rbh is None:
            rbh = relax.const(np.zeros((D, H), "float32"))
        rp = r if packed else bb.emit(_pack_r_relax(relax, op, r, D, H))  # [D, blocks, H, V]
        zeros = bb.emit(relax.op.zeros(relax.ShapeExpr([D, batch, H]), dtype))
        h0 = zeros if h0 is None else h0
        args = [xw, rp]
        if lbr:
            args.append(rbh)
        if op == "LSTM":
            if p is not None:
                if _static(t, op, p, "P", 2) != [D, 3 * H]:
                    _refuse(op, f"P {p.ty}", f" (expected [{D}, {3 * H}])")
                args.append(p)
            args += [h0, zeros if c0 is None else c0]
        else:
            args.append(h0)
        if lens is not None:
            args.append(bb.emit(relax.op.astype(lens, "int32")))

        kernel = _kernel(op, H, D, direction, lbr=lbr, peepholes=p is not None, has_lens=lens is not None)
        gv = bb.add_func(kernel, f"kiln_{op.lower()}")
        state = relax.TensorType([D, batch, H], dtype)
        outs = [relax.TensorType([steps, D, batch, H], dtype), state] + ([state] if op == "LSTM" else [])
        res = bb.emit(relax.call_tir(gv, args, outs), name_hint=op.lower())
        ys = [bb.emit(relax.TupleGetItem(res, i)) for i in range(len(outs))]
        if layout == 1:
            ys = [bb.emit(relax.op.permute_dims(ys[0], [2, 0, 1, 3]))] + [bb.emit(relax.op.permute_dims(s, [1, 0, 2])) for s in ys[1:]]
        return relax.Tuple(ys)

    return convert


def _kernel(op: str, H: int, D: int, direction: str, *, lbr: bool, peepholes: bool, has_lens: bool):
    """The recurrence as one PrimFunc:
        xw    # [T, B, D, G*H]     input projections plus the additive biases
        rp    # [D, blocks, H, V]  R packed (pack_r)
        rbh   # [D, H]             GRU with linear_before_reset: the h gate's recurrent bias
        p     # [D, 3*H]           LSTM peepholes (i, o, f)
        h0 / c0  # [D, B, H]
        lens  # [B] int32          sequence_lens
        -> y [T, D, B, H], y_h [D, B, H] (, y_c [D, B, H]).
    The gate sums g follow rp's blocks: a group's columns from its first block's V * index,
    so GRU's h gate sits at g[HG + j] (HG: the [z, r] group padded to V)."""
    from ..tvm_compat import compiler  # noqa: PLC0415

    T = compiler().T
    GH = _GATES[op] * H
    NB = packed_r_shape(op, (D, GH, H))[1]
    HG = _blocks(2 * H) * V  # GRU: where the h gate's sums start in g
    f32 = "float32"

    def reverse(d):
        return d == 1 if direction == "bidirectional" else T.bool(direction == "reverse")

    @T.macro
    def matvec(g, acc, rp, d, src, first_block, nblocks):
        """g[V*q + v] += sum_k src[k] rp[d, q, k, v] over the blocks q: V sums in registers, k inside."""
        for q in T.serial(nblocks):
            for v in T.vectorized(V):
                acc[v] = g[(first_block + q) * V + v]
            for k in T.serial(H):
                for v in T.vectorized(V):
                    acc[v] = acc[v] + src[k] * rp[d, first_block + q, k, v]
            for v in T.vectorized(V):
                g[(first_block + q) * V + v] = acc[v]

    # One body for the three cells: Python flags pick the code at parse time.
    @T.prim_func(private=True)
    def kernel(var_xw: T.handle, var_rp: T.handle, var_rbh: T.handle, var_p: T.handle, var_h0: T.handle, var_c0: T.handle,
               var_lens: T.handle, var_y: T.handle, var_yh: T.handle, var_yc: T.handle):
        # kiln.cpu_only: a CPU loop nest (no thread bindings): a GPU build must refuse it
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8, "kiln.cpu_only": True})
        steps = T.int64()
        batch = T.int64()
        xw = T.match_buffer(var_xw, (steps, batch, D, GH), f32)
        rp = T.match_buffer(var_rp, (D, NB, H, V), f32)
        rbh = T.match_buffer(var_rbh, (D, H), f32)
        p = T.match_buffer(var_p, (D, 3 * H), f32)
        h0 = T.match_buffer(var_h0, (D, batch, H), f32)
        c0 = T.match_buffer(var_c0, (D, batch, H), f32)
        lens = T.match_buffer(var_lens, (batch,), "int32")
        y = T.match_buffer(var_y, (steps, D, batch, H), f32)
        yh = T.match_buffer(var_yh, (D, batch, H), f32)
        yc = T.match_buffer(var_yc, (D, batch, H), f32)
        for db in T.parallel(D * batch):
            d = db // batch
            b = db % batch
            h = T.alloc_buffer((H,), f32, scope="local")
            c = T.alloc_buffer((H,), f32, scope="local")
            g = T.alloc_buffer((NB * V,), f32, scope="local")
            acc = T.alloc_buffer((V,), f32, scope="local")
            rh = T.alloc_buffer((H,), f32, scope="local")  # GRU: r * h_prev
            for j in T.serial(NB * V):
                g[j] = T.float32(0)  # the padding columns stay 0 (their weights are 0)
            for k in T.serial(H):
                h[k] = h0[d, b, k]
                if op == "LSTM":
                    c[k] = c0[d, b, k]
            # a length from the caller is clamped to [0, T]: never an index outside Y
            n = T.max(T.min(T.Cast("int64", lens[b]), steps), T.int64(0)) if has_lens else steps
            for s in T.serial(steps):
                tt = T.if_then_else(reverse(d), n - 1 - s, s)
                if s < n:
                    if op == "GRU":
                        for j in T.serial(2 * H):
                            g[j] = xw[tt, b, d, j]
                        for j in T.serial(H):
                            g[HG + j] = rbh[d, j] if lbr else xw[tt, b, d, 2 * H + j]
                        matvec(g, acc, rp, d, h, 0, _blocks(2 * H))
                        if lbr:  # r multiplies (h_prev R_h^T + Rb_h)
                            matvec(g, acc, rp, d, h, _blocks(2 * H), _blocks(H))
                            for j in T.serial(H):
                                z = T.sigmoid(g[j])
                                h[j] = (T.float32(1) - z) * T.tanh(xw[tt, b, d, 2 * H + j] + T.sigmoid(g[H + j]) * g[HG + j]) + z * h[j]
                        else:  # the h gate's recurrent input is r * h_prev
                            for k in T.serial(H):
                                rh[k] = T.sigmoid(g[H + k]) * h[k]
                            matvec(g, acc, rp, d, rh, _blocks(2 * H), _blocks(H))
                            for j in T.serial(H):
                                z = T.sigmoid(g[j])
                                h[j] = (T.float32(1) - z) * T.tanh(g[HG + j]) + z * h[j]
                    else:
                        for j in T.serial(GH):
                            g[j] = xw[tt, b, d, j]
                        matvec(g, acc, rp, d, h, 0, NB)
                        if op == "RNN":
                            for j in T.serial(H):
                                h[j] = T.tanh(g[j])
                        else:  # LSTM: i, o, f, c
                            for j in T.serial(H):
                                gi = g[j] + (p[d, j] * c[j] if peepholes else T.float32(0))
                                gf = g[2 * H + j] + (p[d, 2 * H + j] * c[j] if peepholes else T.float32(0))
                                c[j] = T.sigmoid(gf) * c[j] + T.sigmoid(gi) * T.tanh(g[3 * H + j])
                                go = g[H + j] + (p[d, H + j] * c[j] if peepholes else T.float32(0))
                                h[j] = T.sigmoid(go) * T.tanh(c[j])
                    for j in T.serial(H):
                        y[tt, d, b, j] = h[j]
                else:  # past this row's length: Y is 0, the state holds
                    for j in T.serial(H):
                        y[s, d, b, j] = T.float32(0)
            for k in T.serial(H):  # a row of length 0 ends in zeros, not its initial state (onnxruntime)
                yh[d, b, k] = T.if_then_else(n > 0, h[k], T.float32(0))
                if op == "LSTM":
                    yc[d, b, k] = T.if_then_else(n > 0, c[k], T.float32(0))

    # the signature above has every buffer; this variant's body reads only some of them
    used = ["xw", "rp"] + ["rbh"] * lbr + ["p"] * peepholes + ["h0"] + ["c0"] * (op == "LSTM") + ["lens"] * has_lens + ["y", "yh"] + ["yc"] * (op == "LSTM")
    return compiler().tirx.PrimFunc([v for v in kernel.params if v.name in used], kernel.body, kernel.ret_type, kernel.attrs)


RNN_CONVERTERS: dict[str, Callable] = {op: _convert(op) for op in _GATES}
