"""layers.rope (RoPE in the graph: Gemma 3's per-layer bases, Phi-3's LongRoPE) against a
float64 numpy twin: odd sizes (2 sequences of 7 tokens, 3 heads, head_dim 24), positions
that are neither 0.. nor contiguous, per-frequency factors and a cos/sin scale."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.frontends.models.layers import rope, rope_inv_freq
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
