"""kiln's ONNX converters (frontends/onnx_ops.py) on single nodes built with onnx.helper, where
the backend suite (docs/ONNX_BACKEND.md) found TVM's or kiln's own answer wrong: Mod against
numpy's np.mod / np.fmod (onnx's reference) on signed zeros, infinite and zero divisors, NaN and
large quotients; integer Div by zero; float16 Attention against a float64 twin and onnx's reference."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.onnx_build import compile_onnx
from kiln.errors import UnsupportedModelError
from kiln.runtime import load

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

ONNX_TYPE = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE,
             "int8": TensorProto.INT8, "int32": TensorProto.INT32, "int64": TensorProto.INT64, "uint16": TensorProto.UINT16}


def _node_model(path, node, inputs: dict, outputs: dict, opset: int):
    """A one-node graph: inputs / outputs {name: (dtype, shape)}."""
    vi = lambda name, spec: helper.make_tensor_value_info(name, ONNX_TYPE[spec[0]], spec[1])  # noqa: E731
    g = helper.make_graph([node], node.op_type, [vi(n, s) for n, s in inputs.items()], [vi(n, s) for n, s in outputs.items()])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def _compiled(path):
    compile_onnx(path, path.with_suffix(".kiln"))
    return load(path.with_suffix(".kiln"))


# ---------------------------------------------------------------- Mod

def _mod_operands(dtype: str):
    """x, y: the backend suite's edge cases (signed zeros, +-inf and zero divisors, NaN), large
    quotients, then random values of both signs."""
    inf, nan = np.inf, np.nan
    x = [0.0, -0.0, 0.0, -0.0, -3.0, 3.0, -1.0, 1.0, inf, -inf, 1.0, 1.0, nan, 1.0, 0.0, -2.5, 7.0]
    y = [-2.0, 2.0, 2.0, -2.0, inf, inf, -inf, -inf, 2.0, 2.0, 0.0, -0.0, 2.0, nan, inf, -inf, nan]
    big = {"float16": 6e4, "float32": 3e9, "float64": 3e18}[dtype]
    x += [big + 1, -big - 7, big / 3, 1234.5, -1234.5]
    y += [3.0, 3.0, -0.7, 0.1, 0.1]
    rng = np.random.default_rng(18)
    x += list(rng.uniform(-100, 100, 40))
    y += list(rng.uniform(-9, 9, 40))
    return np.array(x, dtype), np.array(y, dtype)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_float_mod_is_numpys(dtype, tmp_path):
    """fmod 0 is np.mod bit for bit: a finite x mod +-inf is x when the signs agree, else the
    divisor (TVM's x - floor(x / y) * y gave NaN); a zero takes the divisor's sign; NaN where
    numpy has NaN. fmod 1 is np.fmod."""
    x, y = _mod_operands(dtype)
    for fmod, want in ((0, np.mod), (1, np.fmod)):
        path = _node_model(tmp_path / f"mod{fmod}.onnx", helper.make_node("Mod", ["x", "y"], ["z"], fmod=fmod),
                           {"x": (dtype, [x.size]), "y": (dtype, [x.size])}, {"z": (dtype, [x.size])}, opset=13)
        got = _compiled(path).run({"x": x, "y": y})["z"]
        with np.errstate(all="ignore"):
            ref = want(x, y)
            onnx_ref = ReferenceEvaluator(str(path)).run(None, {"x": x, "y": y})[0]
        assert np.array_equal(ref, onnx_ref, equal_nan=True)
        bad = ~((got == ref) | (np.isnan(got) & np.isnan(ref))) | (np.signbit(got) != np.signbit(ref))
        assert not bad.any(), f"fmod {fmod}: x {x[bad]} y {y[bad]}: {got[bad]}, numpy {ref[bad]}"


@pytest.mark.parametrize("dtype", ["int8", "int32", "int64", "uint16"])
def test_integer_mod_by_zero_gives_zero(dtype, tmp_path):
    """A zero divisor (and -1 with the type's minimum, whose quotient overflows) trapped the process
    with SIGFPE: the divisor comes from the caller, so both give numpy's 0 instead."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(5)
    x = np.concatenate([[7, info.min, info.max, 0, info.min], rng.integers(info.min, info.max, 30, endpoint=True)]).astype(dtype)
    y = np.concatenate([[0, 0 if info.min == 0 else -1, 0, 0, 3], rng.integers(max(info.min, -50), 50, 30)]).astype(dtype)
    for fmod, want in ((0, np.mod), (1, np.fmod)):
        path = _node_model(tmp_path / f"mod{fmod}.onnx", helper.make_node("Mod", ["x", "y"], ["z"], fmod=fmod),
                           {"x": (dtype, [x.size]), "y": (dtype, [x.size])}, {"z": (dtype, [x.size])}, opset=13)
        got = _compiled(path).run({"x": x, "y": y})["z"]
        with np.errstate(all="ignore"):
            assert np.array_equal(got, want(x, y)), (fmod, x, y, got)


@pytest.mark.parametrize("dtype", ["int8", "int32", "int64", "uint16"])
def test_integer_div_by_zero_is_onnx_reference(dtype, tmp_path):
    """Div of integer tensors truncates (onnx's reference); x / 0 trapped the process with SIGFPE
    and gives the reference's 0 now, the type's minimum / -1 its wrapped minimum."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(9)
    x = np.concatenate([[7, info.min, info.max, 0, info.min, -7 if info.min else 7], rng.integers(info.min, info.max, 30, endpoint=True)]).astype(dtype)
    y = np.concatenate([[0, 0 if info.min == 0 else -1, 0, 0, 3, 2], rng.integers(max(info.min, -50), 50, 30)]).astype(dtype)
    path = _node_model(tmp_path / "div.onnx", helper.make_node("Div", ["x", "y"], ["z"]),
                       {"x": (dtype, [x.size]), "y": (dtype, [x.size])}, {"z": (dtype, [x.size])}, opset=13)
    got = _compiled(path).run({"x": x, "y": y})["z"]
    with np.errstate(all="ignore"):
        want = ReferenceEvaluator(str(path)).run(None, {"x": x, "y": y})[0]
    assert np.array_equal(got, want), (x, y, got, want)


def test_mod_broadcasts_a_constant_divisor(tmp_path):
    """The common exported form: a tensor mod a scalar initializer (negative, so the sign fix-up runs)."""
    x = np.random.default_rng(3).uniform(-50, 50, (3, 7)).astype(np.float32)
    node = helper.make_node("Mod", ["x", "y"], ["z"])
    g = helper.make_graph([node], "mod", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 7])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 7])],
                          [helper.make_tensor("y", TensorProto.FLOAT, [], [-4.5])])
    path = tmp_path / "modc.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    assert np.array_equal(_compiled(path).run({"x": x})["z"], np.mod(x, np.float32(-4.5)))


# ---------------------------------------------------------------- Attention

def _attention_twin(q, k, v, mask=None, past_k=None, past_v=None, causal=False):
    """Y in float64, 4-D inputs [batch, heads, seq, head]."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    past = 0
    if past_k is not None:
        past = past_k.shape[2]
        k, v = np.concatenate([past_k, k], 2).astype(np.float64), np.concatenate([past_v, v], 2).astype(np.float64)
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[3])
    if mask is not None:
        s = s + mask.astype(np.float64)
    if causal:
        i, j = np.arange(s.shape[2])[:, None], np.arange(s.shape[3])[None]
        s = s + np.where(j <= i + past, 0.0, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


ATTENTION_CASES = {  # name: (q heads, kv heads, query seq, key seq, past seq, mask, causal)
    "plain": (3, 3, 5, 7, 0, False, False),
    "causal": (3, 3, 5, 7, 0, False, True),
    "gqa_past_mask": (6, 2, 5, 7, 4, True, False),
}


@pytest.mark.parametrize("name", ATTENTION_CASES)
def test_float16_attention_rounds_once(name, tmp_path):
    """float16 Q, K, V: computed in float32 and rounded once, Y is within an ulp of the float64
    twin (float16 products and softmax were several ulps off) and within 2 ulps at 1.0 of onnx's
    reference (which rounds the scores and the softmax's steps to float16)."""
    qh, kvh, sq, skv, past, with_mask, causal = ATTENTION_CASES[name]
    head, batch = 8, 2
    rng = np.random.default_rng(23)
    h = lambda *shape: rng.uniform(-1.5, 1.5, shape).astype(np.float16)  # noqa: E731
    feeds = {"q": h(batch, qh, sq, head), "k": h(batch, kvh, skv, head), "v": h(batch, kvh, skv, head)}
    names = ["q", "k", "v"]
    if with_mask:
        feeds["mask"] = (rng.uniform(-1, 1, (sq, past + skv)) * (rng.uniform(size=(sq, past + skv)) > 0.2)).astype(np.float16)
        names.append("mask")
    if past:
        feeds["past_k"], feeds["past_v"] = h(batch, kvh, past, head), h(batch, kvh, past, head)
        names += ["past_k", "past_v"] if with_mask else ["", "past_k", "past_v"]
    outs = ["y"] + (["present_k", "present_v"] if past else [])
    node = helper.make_node("Attention", names, outs, **({"is_causal": 1} if causal else {}))
    shapes = {n: ("float16", list(a.shape)) for n, a in feeds.items()}
    out_shapes = {"y": ("float16", [batch, qh, sq, head])}
    if past:
        out_shapes |= {o: ("float16", [batch, kvh, past + skv, head]) for o in outs[1:]}
    path = _node_model(tmp_path / f"{name}.onnx", node, shapes, out_shapes, opset=23)
    got = _compiled(path).run(feeds)
    twin = _attention_twin(feeds["q"], feeds["k"], feeds["v"], feeds.get("mask"), feeds.get("past_k"), feeds.get("past_v"), causal)
    y = got["y"].astype(np.float64)
    ulp = np.spacing(np.abs(twin).astype(np.float16)).astype(np.float64)
    assert (np.abs(y - twin) <= ulp).all(), float((np.abs(y - twin) / ulp).max())
    ref = ReferenceEvaluator(str(path)).run(None, feeds)
    np.testing.assert_allclose(y, ref[0].astype(np.float64), rtol=1e-3, atol=2e-3)
    for i, o in enumerate(outs[1:], 1):
        assert got[o].dtype == np.float16 and np.array_equal(got[o], ref[i])


def test_bfloat16_attention_is_refused(tmp_path):
    """Computed in float32 it is 1-2 bfloat16 ulps off onnx's reference (which rounds every step):
    refused in one line rather than answered differently."""
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"])
    vi = lambda n, s: helper.make_tensor_value_info(n, TensorProto.BFLOAT16, s)  # noqa: E731
    g = helper.make_graph([node], "att", [vi("q", [1, 2, 3, 8]), vi("k", [1, 2, 4, 8]), vi("v", [1, 2, 4, 8])], [vi("y", [1, 2, 3, 8])])
    path = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]), str(path))
    with pytest.raises(UnsupportedModelError, match="Attention in bfloat16 is not supported") as err:
        compile_onnx(path, tmp_path / "bf16.kiln")
    assert "\n" not in str(err.value)
