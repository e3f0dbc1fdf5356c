"""layers.rope (RoPE in the graph: Gemma 3's per-layer bases, Phi-3's LongRoPE) against a
float64 numpy twin: odd sizes (2 sequences of 7 tokens, 3 heads, head_dim 24), positions
that are neither 0.. nor contiguous, per-frequency factors and a cos/sin scale. And
layers.head_rms_norm (Qwen3's per-head q/k RMSNorm as one op) against its twin."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.frontends.models.layers import head_rms_norm, rope, rope_inv_freq
from kiln.tvm_compat import compiler

TOL = {"float32": dict(rtol=2e-5, atol=2e-5)}

t = compiler()
nn = t.nn


def rope_twin(x: np.ndarray, positions: np.ndarray, theta: float, factors, mscale: float) -> np.ndarray:
    """Rotate-half RoPE in float64: x [b, s, h, d], positions [b * s]."""
    b, s, h, d = x.shape
    half = d // 2
    inv = 1.0 / (np.broadcast_to(np.asarray(factors, np.float64), (half,)) * theta ** (np.arange(0, d, 2) / d))
    ang = positions.reshape(b, s, 1, 1).astype(np.float64) * inv  # [b, s, 1, half]
    cos, sin = np.cos(ang) * mscale, np.sin(ang) * mscale
    x = x.astype(np.float64)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class _Rope(nn.Module):
    def __init__(self, inv_freq, mscale):
        self.inv_freq, self.mscale = inv_freq, mscale

    def forward(self, x, positions):
        return rope(x, positions, self.inv_freq, self.mscale)


@pytest.mark.parametrize(("theta", "factors", "mscale"), [(10000.0, 1.0, 1.0), (1e6, 8.0, 1.0), (10000.0, np.linspace(1.0, 3.1, 12), 1.19)],
                         ids=["plain", "linear8", "longrope"])
def test_rope_matches_twin(theta, factors, mscale):
    b, s, h, d = 2, 7, 3, 24
    rng = np.random.default_rng(11)
    x = rng.standard_normal((b, s, h, d)).astype(np.float32)
    positions = rng.permutation(np.arange(40, 40 + 3 * b * s))[: b * s].astype(np.int32)  # scattered, up to ~80
    mod = _Rope(rope_inv_freq(theta, d, None if np.isscalar(factors) and factors == 1.0 else factors), mscale)
    spec = {"forward": {"x": nn.spec.Tensor([b, s, h, d], "float32"), "positions": nn.spec.Tensor([b * s], "int32"),
                        "$": {"param_mode": "none", "effect_mode": "none"}}}
    irmod, _ = mod.export_tvm(spec=spec)
    ex = t.relax.build(irmod, target=t.tvm.target.Target("llvm"))
    vm = t.relax.VirtualMachine(ex, t.tvm.cpu())
    got = vm["forward"](t.tvm.runtime.tensor(x), t.tvm.runtime.tensor(positions)).numpy()
    np.testing.assert_allclose(got, rope_twin(x, positions, theta, factors, mscale), **TOL["float32"])


# --- layers.head_rms_norm: the other in-graph step before attention (Qwen3, Gemma 3) ----------
def head_rms_norm_twin(x: np.ndarray, qw: np.ndarray, kw: np.ndarray, n_q: int, n_k: int, eps: float) -> np.ndarray:
    """x [b, s, heads, d]: RMSNorm of the first n_q heads with qw, the next n_k with kw, the rest as they are."""
    x = x.astype(np.float64)
    normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    w = np.concatenate([np.broadcast_to(qw, (n_q, x.shape[-1])), np.broadcast_to(kw, (n_k, x.shape[-1]))]).astype(np.float64)
    out = x.copy()
    out[:, :, : n_q + n_k] = normed[:, :, : n_q + n_k] * w
    return out


class _HeadNorm(nn.Module):
    def __init__(self, n_q, n_k, d, eps):
        self.qw, self.kw = nn.Parameter((d,), "float32"), nn.Parameter((d,), "float32")
        self.n_q, self.n_k, self.eps = n_q, n_k, eps

    def forward(self, x):
        return head_rms_norm(x, self.qw, self.kw, self.n_q, self.n_k, self.eps)


@pytest.mark.parametrize(("n_q", "n_k", "n_v"), [(3, 1, 1), (4, 2, 2)])
def test_head_rms_norm_matches_twin(n_q, n_k, n_v):
    b, s, d, eps = 2, 7, 24, 1e-6
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((b, s, n_q + n_k + n_v, d)) * rng.uniform(0.1, 4.0, (1, 1, n_q + n_k + n_v, 1))).astype(np.float32)
    qw, kw = rng.uniform(0.5, 1.5, d).astype(np.float32), rng.uniform(-1.5, -0.5, d).astype(np.float32)
    spec = {"forward": {"x": nn.spec.Tensor(list(x.shape), "float32"), "$": {"param_mode": "plain", "effect_mode": "none"}}}
    irmod, params = _HeadNorm(n_q, n_k, d, eps).export_tvm(spec=spec)
    vm = t.relax.VirtualMachine(t.relax.build(irmod, target=t.tvm.target.Target("llvm")), t.tvm.cpu())
    by_name = {"qw": qw, "kw": kw}
    got = vm["forward"](t.tvm.runtime.tensor(x), *[t.tvm.runtime.tensor(by_name[n]) for n, _ in params]).numpy()
    np.testing.assert_allclose(got, head_rms_norm_twin(x, qw, kw, n_q, n_k, eps), **TOL["float32"])


@pytest.mark.parametrize("scaling", [{}, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 32}])
@pytest.mark.parametrize("apply", [1, 0])
def test_cpu_rope_on_append_equals_tvms(scaling, apply):
    """kernels/rope_cpu.py (angles once per token and dimension, every head) against TVM's
    llama_rope_with_position_map (angles per element), which it replaces in CPU KV caches:
    the same q, k, v bit for bit, positions neither 0.. nor contiguous, 5 q / 2 kv heads."""
    from tvm.relax.frontend.nn.llm import kv_cache as tvm_kv  # noqa: PLC0415

    from kiln.passes.kernels.rope_cpu import rope_split_cpu, rope_supported  # noqa: PLC0415

    tvm = t.tvm
    hq, hkv, d, n, theta = 5, 2, 24, 9, 10000.0
    assert rope_supported(scaling) and not rope_supported({"rope_type": "yarn"})
    rng = np.random.default_rng(7)
    qkv = rng.standard_normal((n, hq + 2 * hkv, d)).astype(np.float32)
    pos = np.array([3, 4, 5, 40, 41, 97, 98, 99, 700], np.int32)
    outs = []
    for f in (rope_split_cpu(theta, 1.0, d, hq, hkv, "float32", scaling, d),
              tvm_kv.llama_rope_with_position_map(theta, 1.0, d, hq, hkv, "float32", scaling, d)):
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target="llvm")
        dev = tvm.cpu()
        res = [tvm.runtime.tensor(np.zeros((n, h, d), np.float32), dev) for h in (hq, hkv, hkv)]
        lib["main"](tvm.runtime.tensor(qkv, dev), tvm.runtime.tensor(pos, dev), *res, apply)
        outs.append([r.numpy() for r in res])
    for mine, theirs in zip(*outs):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-6)
    if not apply:
        np.testing.assert_array_equal(outs[0][0], qkv[:, :hq])
