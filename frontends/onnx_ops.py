"""kiln's converters for ONNX operators, tried before TVM's (frontends/onnx_graph.py
subclasses TVM's importer: a converter here returns None to leave the node to TVM's).

Range: TVM 0.27 computes every non-constant Range's length as a tensor and
turns it back into a new symbolic dimension (`tensor_to_shape` + `match_cast`),
so `x + Range(0, Shape(x)[1], 1)` adds a [b, s] and a [range_len] tensor whose
broadcast shape is unknown, and legalization fails ("emit_te now only supports
Tensor that has ShapeExpr shape"). When the bounds are dimensions (PrimValues,
as TVM's Gather makes of `Shape(x)[i]`) or constants, kiln emits `arange` over
them directly: its length is then `s`, the same symbol as x's dimension.

Cast: see convert_cast.

The rest were found by ONNX's backend test suite (benchmarks/onnx_backend_suite.py,
docs/ONNX_BACKEND.md), each where TVM's converter fails or returns a wrong value:
Max / Min / Sum / Mean fold their inputs pairwise (TVM stacks them and reduces, and
ConvertLayout has no layout for the stacked axis: ResNet-50 and ShuffleNet's Sum);
Dropout is the identity at inference (TVM's nn.dropout tuple also stopped ConvertLayout:
AlexNet, VGG, SqueezeNet, Inception); LayerNormalization's Mean and InvStdDev outputs
(TVM returns 0-d placeholders); IsInf's detect_positive / detect_negative; Pow with
mixed or integer types; Constant's value_float(s) / value_int(s); RMSNormalization over
every axis; EyeLike's dtype; Expand to a shape of lower rank; ConvTranspose's
output_shape; SequenceInsert at a negative position; ONNX's own Attention (opset 23;
float16 computed in float32); Mod as numpy's (infinite divisors, large quotients, integer
zero divisors); integer Div by a run-time zero (0, not SIGFPE). Training-mode BatchNormalization and Dropout, RoiAlign's max mode (TVM
computes another maximum than ONNX's) and bfloat16 Attention are refused rather than
computed wrongly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import UnsupportedModelError


def _scalar(t, x):
    """A PrimExpr for a constant or a PrimValue / PrimExpr input; None for a tensor computed at run time."""
    if x is None:
        return None
    if t.tvm.ir.is_prim_expr(x):  # TVM 0.27: a PrimValue is the PrimExpr itself
        return x
    if isinstance(x, t.tvm.ir.GenericConst):
        v = x.value.numpy()
        if v.size == 1 and v.dtype.kind in "iu":
            return t.tvm.tirx.IntImm("int64", int(v.reshape(-1)[0]))
    return None


def _dtype(v) -> str:
    return str(getattr(v, "dtype", None) or v.ty)  # TVM 0.27 PrimExprs carry their dtype as `ty`


def convert_range(t, bb, inputs, attrs):
    start, limit, delta = (_scalar(t, x) for x in inputs[:3])
    if start is None or limit is None or delta is None:
        return None
    if any(_dtype(v) not in ("int64", "int32") for v in (start, limit, delta)):
        return None
    dtype = "int32" if all(_dtype(v) == "int32" for v in (start, limit, delta)) else "int64"
    if not isinstance(delta, t.tvm.tirx.IntImm) or int(delta) == 0:
        return None  # the length needs the sign of delta: leave it to TVM's converter
    i64 = lambda v: v if _dtype(v) == "int64" else t.tvm.tirx.Cast("int64", v)  # noqa: E731
    return t.relax.op.arange(i64(start), i64(limit), i64(delta), dtype=dtype)


def convert_cast(t, bb, inputs, attrs):
    """Cast of a shape (Shape -> Cast(int32) -> Slice -> Cast(int64) -> Concat -> Reshape: Paddle's exports)
    to an integer type keeps it a shape: TVM's converter makes it a tensor, and the Reshape
    at the end of the chain then has no shape to reshape to."""
    if isinstance(inputs[0], t.relax.ShapeExpr) and attrs.get("to") in (6, 7):  # INT32, INT64
        return inputs[0]
    return None


def _const(t, x):
    """The numpy value of a constant input; None for anything computed at run time."""
    return x.value.numpy() if isinstance(x, t.tvm.ir.GenericConst) else None


def _tensor_dtype(x) -> str:
    return str(x.ty.dtype)


def _static_shape(x) -> list[int] | None:
    shape = getattr(x.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(hasattr(v, "value") for v in values):
        return None
    return [int(v.value) for v in values]


def _variadic(op: str, mean: bool = False):
    """Max, Min, Sum, Mean: the inputs folded pairwise with the broadcasting binary op."""

    def convert(t, bb, inputs, attrs):
        xs = [x for x in inputs if x is not None]
        if not xs or any(t.tvm.ir.is_prim_expr(x) or isinstance(x.ty, t.relax.ShapeType) for x in xs):
            return None
        binary = getattr(t.relax.op, op)
        out = xs[0]
        for x in xs[1:]:
            out = bb.emit(binary(out, x))
        if mean and len(xs) > 1:
            out = t.relax.op.divide(out, t.relax.const(len(xs), _tensor_dtype(out)))
        return out

    return convert


def convert_dropout(t, bb, inputs, attrs):
    """Inference: Y = X and a mask of ones. A non-zero ratio in training mode (random) is refused."""
    x = inputs[0]
    ratio = _const(t, inputs[1]) if len(inputs) > 1 and inputs[1] is not None else np.float32(attrs.get("ratio", 0.5))
    training = inputs[2] if len(inputs) > 2 else None
    train = _const(t, training) if training is not None else np.bool_(False)
    if attrs.get("is_test", 1) == 0:  # opsets before 7: training unless is_test
        train = np.bool_(True)
    if (train is None or bool(train)) and (ratio is None or float(ratio) != 0):
        raise UnsupportedModelError("Dropout in training mode (random masks; training_mode true or computed at run time) "
                                    "is not supported: export the model for inference")
    if attrs["tvm_custom"]["num_outputs"] < 2:
        return x
    return t.relax.Tuple([x, t.relax.op.ones_like(x, "bool")])


def convert_layer_norm(t, bb, inputs, attrs):
    """Only when Mean / InvStdDev are used (TVM's converter returns 0-d placeholders for them)."""
    if attrs["tvm_custom"]["num_outputs"] < 2:
        return None
    R = t.relax.op
    x, scale, bias = inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None
    ndim = x.ty.ndim
    if ndim < 0:
        return None
    axis = attrs.get("axis", -1) % ndim
    axes = list(range(axis, ndim))
    dtype = _tensor_dtype(x)
    stash = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}.get(attrs.get("stash_type", 1), "float32")
    xs = bb.emit(R.astype(x, stash)) if stash != dtype else x
    mean = bb.emit(R.mean(xs, axes, keepdims=True))
    centered = bb.emit(R.subtract(xs, mean))
    var = bb.emit(R.mean(R.multiply(centered, centered), axes, keepdims=True))
    inv_std = bb.emit(R.rsqrt(R.add(var, t.relax.const(attrs.get("epsilon", 1e-5), stash))))
    y = R.multiply(centered, inv_std)
    y = bb.emit(R.astype(y, dtype) if stash != dtype else y)
    y = R.multiply(y, scale)
    if bias is not None:
        y = R.add(y, bias)
    return t.relax.Tuple([bb.emit(y), mean, inv_std])


def convert_rms_norm(t, bb, inputs, attrs):
    """RMSNormalization over every axis (axis 0): TVM's rms_norm op fails to lower there."""
    x, scale = inputs[0], inputs[1]
    ndim = x.ty.ndim
    if ndim < 1 or attrs.get("axis", -1) % ndim != 0:
        return None
    R = t.relax.op
    dtype = _tensor_dtype(x)
    stash = "float32" if attrs.get("stash_type", 1) == 1 else dtype
    xs = bb.emit(R.astype(x, stash)) if stash != dtype else x
    ms = bb.emit(R.mean(R.multiply(xs, xs), list(range(ndim)), keepdims=True))
    y = R.multiply(xs, R.rsqrt(R.add(ms, t.relax.const(attrs.get("epsilon", 1e-5), stash))))
    y = bb.emit(R.astype(y, dtype) if stash != dtype else y)
    return R.multiply(y, scale)


def convert_isinf(t, bb, inputs, attrs):
    pos, neg = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
    if pos and neg:
        return None
    R = t.relax.op
    x = inputs[0]
    if not (pos or neg):
        return R.zeros_like(x, "bool")
    zero = t.relax.const(0, _tensor_dtype(x))
    return R.logical_and(R.isinf(x), R.greater(x, zero) if pos else R.less(x, zero))


def convert_pow(t, bb, inputs, attrs):
    """Pow(T, T1): the exponent in the base's type; integer bases computed in float64 and
    cast back (TVM's power takes floats of one type only)."""
    x, y = inputs[0], inputs[1]
    if any(t.tvm.ir.is_prim_expr(v) or not isinstance(v.ty, t.relax.TensorType) for v in (x, y)):
        return None
    dx, dy = _tensor_dtype(x), _tensor_dtype(y)
    R = t.relax.op
    if dx.startswith(("float", "bfloat")):
        return None if dx == dy else R.power(x, R.astype(y, dx))
    wide = "float64"
    return R.astype(R.power(R.astype(x, wide), R.astype(y, wide)), dx)


def convert_constant(t, bb, inputs, attrs):
    """Constant's value_float(s) / value_int(s) (TVM's converter reads `value` only)."""
    for key, dtype in (("value_float", "float32"), ("value_floats", "float32"), ("value_int", "int64"), ("value_ints", "int64")):
        if key in attrs:
            return t.relax.const(np.asarray(attrs[key], dtype=dtype), dtype)
    return None


def convert_eye_like(t, bb, inputs, attrs):
    """EyeLike's `dtype` attribute is the output's type (TVM refuses one unlike the input's)."""
    if "dtype" not in attrs:
        return None
    from onnx import helper  # noqa: PLC0415

    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(attrs["dtype"])).name
    # eye_like's own dtype argument is lost in legalization (the result had the input's type)
    return t.relax.op.astype(t.relax.op.eye_like(inputs[0], attrs.get("k", 0)), dtype)


def convert_expand(t, bb, inputs, attrs):
    """Expand to a constant shape of lower rank than the input (ONNX broadcasts both ways;
    TVM's broadcast_to wants at least the input's rank)."""
    x, shape = inputs[0], _const(t, inputs[1])
    if shape is None and not isinstance(inputs[1], t.relax.ShapeExpr):
        # a shape only known at run time: TVM's converter takes its values as the target shape, so a 1
        # in it shrinks a dimension the input has (ONNX broadcasts both ways): [3, 1] to [3, 1, 3] gave
        # [3, 1, 3], not [3, 3, 3]
        raise UnsupportedModelError("Expand to a shape computed at run time (a tensor, not a constant or the input's "
                                    "dimensions) is not supported")
    xs = _static_shape(x) if shape is not None else None
    if xs is None or shape.size >= len(xs):
        return None
    return t.relax.op.broadcast_to(x, t.relax.ShapeExpr(list(np.broadcast_shapes(tuple(xs), tuple(int(d) for d in shape)))))


def convert_batch_norm(t, bb, inputs, attrs):
    if attrs.get("training_mode", 0) or attrs["tvm_custom"]["num_outputs"] > 1:
        raise UnsupportedModelError("BatchNormalization in training mode (batch statistics, running mean / var outputs) "
                                    "is not supported: export the model for inference")
    return None


def convert_roi_align(t, bb, inputs, attrs):
    mode = attrs.get("mode", b"avg")
    if (mode.decode() if isinstance(mode, bytes) else str(mode)) == "max":
        raise UnsupportedModelError("RoiAlign mode 'max' is not supported (TVM's roi_align takes another maximum than ONNX's)")
    return None


def convert_conv_transpose(t, bb, inputs, attrs):
    """output_shape given: the pads it implies (ONNX's formula), then TVM's converter
    (which ignores output_shape)."""
    out_shape = attrs.get("output_shape")
    xs = _static_shape(inputs[0])
    ws = _static_shape(inputs[1])
    if out_shape is None or xs is None or ws is None:
        return None
    nsp = len(xs) - 2
    out_shape = list(out_shape)[-nsp:]
    strides = list(attrs.get("strides", [1] * nsp))
    dil = list(attrs.get("dilations", [1] * nsp))
    kernel = list(attrs.get("kernel_shape", ws[2:]))
    opad = list(attrs.get("output_padding", [0] * nsp))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    begin, end = [], []
    for i in range(nsp):
        total = strides[i] * (xs[2 + i] - 1) + opad[i] + (kernel[i] - 1) * dil[i] + 1 - out_shape[i]
        if total < 0:  # a larger output than the input reaches: the extra rows at the end, as output_padding
            opad[i] -= total
            total = 0
        first = total - total // 2 if auto == "SAME_LOWER" else total // 2
        begin.append(first)
        end.append(total - first)
    attrs.pop("output_shape")
    attrs["auto_pad"] = b"NOTSET"
    attrs["pads"] = tuple(begin + end)
    attrs["output_padding"] = tuple(opad)
    return None  # TVM's converter, with these pads


def convert_sequence_insert(t, bb, inputs, attrs):
    """A negative position p counts from the back as in Python's list.insert (ONNX's
    reference): -1 inserts before the last tensor; TVM's converter appends there."""
    seq, pos = inputs[0], _const(t, inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None
    if pos is None or int(pos) >= 0 or not isinstance(seq, t.relax.Tuple):
        return None
    fields = list(seq.fields)
    p = int(pos) + len(fields)
    if p < 0:
        return None  # out of range: TVM's converter reports it
    fields.insert(p, inputs[1])
    return t.relax.Tuple(fields)


def convert_attention(t, bb, inputs, attrs):
    """ONNX's Attention (opset 23; TVM's converter of that name is com.microsoft's contrib op
    and fails with KeyError 'num_heads'): Q, K, V in 3-D [batch, seq, heads * head] or 4-D
    [batch, heads, seq, head], past_key / past_value concatenated on the sequence axis,
    grouped K/V heads repeated, sqrt(scale) on Q and K, softcap, then the additive mask
    (bool: True attends) and the causal mask aligned bottom-right (a query attends keys up
    to its own position after the past), softmax, a row with no key to attend gives 0.
    Outputs Y, present_key, present_value, qk_matmul_output (modes 0-3). Shapes must be
    static (pin them with --input-shape). float16 is computed in float32 (products, mask,
    softmax) and rounded once at the end: rounding the scores, the probabilities and the
    matmuls' sums to float16 on the way put Y 1-3 ulps off onnx's reference (whose matmuls sum
    in float32), more than rtol 1e-3. bfloat16 is refused (see below)."""
    R, relax = t.relax.op, t.relax
    q, k, v = inputs[:3]
    mask, past_k, past_v = (inputs[i] if len(inputs) > i else None for i in (3, 4, 5))
    shapes = [_static_shape(x) for x in (q, k, v, *(x for x in (mask, past_k, past_v) if x is not None))]
    if any(s is None for s in shapes) or any(t.tvm.ir.is_prim_expr(x) for x in (q, k, v)):
        raise UnsupportedModelError("Attention with symbolic shapes is not supported: pin the inputs with --input-shape")
    qs, ks, vs = shapes[:3]
    dtype = _tensor_dtype(q)
    if dtype == "bfloat16":  # computed in float32 it is 1-2 bfloat16 ulps off onnx's reference, which rounds each step
        raise UnsupportedModelError("Attention in bfloat16 is not supported")
    rank3 = len(qs) == 3
    if rank3:
        qh, kvh = int(attrs["q_num_heads"]), int(attrs["kv_num_heads"])

        def heads(x, shape, h):  # [b, s, h * d] -> [b, h, s, d]
            return bb.emit(R.permute_dims(bb.emit(R.reshape(x, [shape[0], shape[1], h, shape[2] // h])), [0, 2, 1, 3]))

        q, k, v = heads(q, qs, qh), heads(k, ks, kvh), heads(v, vs, kvh)
    else:
        qh, kvh = qs[1], ks[1]
    head = qs[2] // qh if rank3 else qs[3]
    past = _static_shape(past_k)[2] if past_k is not None else 0
    if past_k is not None:
        k, v = bb.emit(R.concat([past_k, k], axis=2)), bb.emit(R.concat([past_v, v], axis=2))
    present_k, present_v = k, v
    sq, skv = (qs[1] if rank3 else qs[2]), _static_shape(k)[2]
    ct = "float32" if dtype == "float16" else dtype  # the type computed in (see above)
    if ct != dtype:
        q, k, v = (bb.emit(R.astype(x, ct)) for x in (q, k, v))
        if mask is not None and _tensor_dtype(mask) != "bool":
            mask = bb.emit(R.astype(mask, ct))
    if qh != kvh:  # grouped: each K/V head serves qh / kvh query heads, [h0, h0, h1, h1, ...]
        k, v = bb.emit(R.repeat(k, qh // kvh, axis=1)), bb.emit(R.repeat(v, qh // kvh, axis=1))
    root = relax.const(np.sqrt(attrs.get("scale", 1.0 / np.sqrt(head))), ct)
    scores = bb.emit(R.matmul(R.multiply(q, root), R.permute_dims(R.multiply(k, root), [0, 1, 3, 2])))  # [b, h, sq, skv]
    softcap = attrs.get("softcap", 0.0)
    if softcap > 0:
        cap = relax.const(softcap, ct)
        scores = bb.emit(R.multiply(R.tanh(R.divide(scores, cap)), cap))
    qk_out = scores
    bias = None
    if mask is not None:
        ms = _static_shape(mask)
        is_bool = _tensor_dtype(mask) == "bool"
        if ms[-1] < skv:  # a mask shorter than the keys: the rest masked out
            fill = np.zeros(ms[:-1] + [skv - ms[-1]], "bool") if is_bool else np.full(ms[:-1] + [skv - ms[-1]], -np.inf, ct)
            mask = R.concat([mask, relax.const(fill)], axis=-1)
        bias = bb.emit(R.where(mask, relax.const(0.0, ct), relax.const(-np.inf, ct)) if is_bool else mask)
    if attrs.get("is_causal", 0):
        i, j = np.arange(sq)[:, None], np.arange(skv)[None, :]
        causal = relax.const(np.where(j <= i + past, 0.0, -np.inf).astype(ct))
        bias = causal if bias is None else bb.emit(R.add(bias, causal))
    if bias is not None:
        scores = bb.emit(R.add(scores, bias))
    mode = attrs.get("qk_matmul_output_mode", 0)
    if mode == 2:
        qk_out = scores
    precision = attrs.get("softmax_precision")
    if precision is not None:
        from onnx import helper  # noqa: PLC0415

        precision = np.dtype(helper.tensor_dtype_to_np_dtype(precision)).name
        if np.dtype(precision).itemsize > np.dtype(ct).itemsize:  # not wider: float32 is kept (see above)
            scores = bb.emit(R.astype(scores, precision))
    probs = bb.emit(R.nn.softmax(scores, axis=-1))
    if bias is not None:  # rows with no key to attend: 0, not softmax's NaN (max's -inf would be the lowest finite value)
        attends = R.logical_not(R.logical_and(R.isinf(bias), R.less(bias, relax.const(0.0, ct))))
        none_left = bb.emit(R.equal(R.max(R.astype(attends, "int32"), axis=-1, keepdims=True), relax.const(0, "int32")))
        probs = bb.emit(R.where(none_left, relax.const(0.0, _tensor_dtype(probs)), probs))
    if mode == 3:
        qk_out = probs
    probs = bb.emit(R.astype(probs, ct)) if _tensor_dtype(probs) != ct else probs
    y = bb.emit(R.matmul(probs, v))  # [b, h, sq, hv]
    if ct != dtype:
        y = bb.emit(R.astype(y, dtype))
    if rank3:
        y = bb.emit(R.reshape(bb.emit(R.permute_dims(y, [0, 2, 1, 3])), [qs[0], sq, -1]))
    n = attrs["tvm_custom"]["num_outputs"]
    if n == 1:
        return y
    if _tensor_dtype(qk_out) != dtype:
        qk_out = R.astype(qk_out, dtype)
    return relax.Tuple([y, present_k, present_v, bb.emit(qk_out)][:n])


def convert_mod(t, bb, inputs, attrs):
    """Mod as numpy's np.mod (fmod 0) and np.fmod (fmod 1), onnx's reference.

    Floats with fmod 0: fmod(x, y) (exact, the sign of x), plus y where the signs differ, and a
    zero the sign of y: numpy's divmod. TVM's floor_mod computes x - floor(x / y) * y, which is
    NaN for y = +-inf (Mod-28 spells out x where the signs agree, y otherwise) and is off by
    the rounding of x / y (float32: 3e9 mod 7 gave 32, 1234.5 mod 0.1 a negative). Integers: a zero divisor (and -1, whose
    INT_MIN quotient overflows) trapped the process with SIGFPE; both give 0, numpy's result,
    by dividing by 1 there."""
    x, y = inputs[0], inputs[1]
    if any(t.tvm.ir.is_prim_expr(v) or not isinstance(v.ty, t.relax.TensorType) for v in (x, y)):
        return None
    R, relax = t.relax.op, t.relax
    dtype = _tensor_dtype(x)
    if dtype != _tensor_dtype(y):
        return None
    floor = attrs.get("fmod", 0) == 0
    if dtype.startswith(("int", "uint")):
        one, zero = relax.const(1, dtype), relax.const(0, dtype)
        trap = R.equal(y, zero) if dtype.startswith("uint") else R.logical_or(R.equal(y, zero), R.equal(y, relax.const(-1, dtype)))
        safe = bb.emit(R.where(trap, one, y))
        return R.floor_mod(x, safe) if floor else R.mod(x, safe)
    if not floor or not dtype.startswith("float"):
        return None
    zero = relax.const(0.0, dtype)
    r = bb.emit(R.mod(x, y))  # fmod
    y_neg = R.less(y, zero)
    wrong_sign = R.logical_and(R.not_equal(r, zero), R.logical_xor(R.less(r, zero), y_neg))
    r = bb.emit(R.where(wrong_sign, R.add(r, y), r))
    return R.where(R.equal(r, zero), R.where(y_neg, relax.const(-0.0, dtype), zero), r)


def convert_div(t, bb, inputs, attrs):
    """Integer Div by a tensor computed at run time: a zero divisor trapped the process with SIGFPE
    (and -1 with the type's minimum: its quotient overflows). onnx's reference gives 0 for x / 0 and
    the wrapped -x for x / -1; kiln divides by 1 there and selects those. Constant divisors stay
    TVM's (it refuses a zero at import)."""
    x, y = inputs[0], inputs[1]
    if any(t.tvm.ir.is_prim_expr(v) or not isinstance(v.ty, t.relax.TensorType) for v in (x, y)) or _const(t, y) is not None:
        return None
    dtype = _tensor_dtype(x)
    if dtype != _tensor_dtype(y) or not dtype.startswith(("int", "uint")):
        return None
    R, relax = t.relax.op, t.relax
    zero, one = relax.const(0, dtype), relax.const(1, dtype)
    by_zero = bb.emit(R.equal(y, zero))
    if dtype.startswith("uint"):
        return R.where(by_zero, zero, R.divide(x, bb.emit(R.where(by_zero, one, y))))
    by_minus_one = bb.emit(R.equal(y, relax.const(-1, dtype)))
    q = R.divide(x, bb.emit(R.where(R.logical_or(by_zero, by_minus_one), one, y)))  # x where y is 0 or -1
    return R.where(by_zero, zero, R.where(by_minus_one, R.subtract(zero, x), q))


CONVERTERS: dict[str, Callable] = {"Range": convert_range, "Cast": convert_cast,
                                   "Max": _variadic("maximum"), "Min": _variadic("minimum"), "Sum": _variadic("add"),
                                   "Mean": _variadic("add", mean=True), "Dropout": convert_dropout,
                                   "LayerNormalization": convert_layer_norm, "RMSNormalization": convert_rms_norm,
                                   "IsInf": convert_isinf, "Pow": convert_pow, "Constant": convert_constant,
                                   "EyeLike": convert_eye_like, "Expand": convert_expand, "BatchNormalization": convert_batch_norm,
                                   "RoiAlign": convert_roi_align, "ConvTranspose": convert_conv_transpose,
                                   "SequenceInsert": convert_sequence_insert, "Attention": convert_attention,
                                   "Mod": convert_mod, "Div": convert_div}
