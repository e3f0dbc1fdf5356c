"""Targets: an explicit CPU (`llvm:x86-64-v3`) compiles, records what it needs,
and runs with the same results; fp16/bf16 storage stays close to fp32;
malformed target strings fail with the accepted forms."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from kiln.errors import CompileError
from kiln.runtime import load

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 CPU names")


def _compile(tiny_checkpoint, tmp_path, **kw):
    from kiln.compiler.build import compile_model  # noqa: PLC0415

    out = tmp_path / "m.kiln"
    compile_model(tiny_checkpoint("llama"), out, **kw)
    return out


def test_explicit_cpu_target_runs_and_matches_native(tiny_checkpoint, compiled, tmp_path):
    art = _compile(tiny_checkpoint, tmp_path, target="llvm:x86-64-v3", dtype="float32")
    s = load(art)
    tgt = s.artifact.manifest["targets"][0]
    assert tgt["mcpu"] == "x86-64-v3"
    assert {"avx2", "fma"} <= set(tgt["required_cpu_flags"])
    assert "avx512f" not in tgt["required_cpu_flags"]
    ids = list(range(3, 40))
    native = load(compiled("llama")).logits(ids)
    np.testing.assert_allclose(s.logits(ids), native, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [("float16", 2e-2), ("bfloat16", 5e-2)])
def test_half_precision_storage_close_to_float32(tiny_checkpoint, compiled, tmp_path, dtype, tol):
    art = _compile(tiny_checkpoint, tmp_path, dtype=dtype)
    s = load(art)
    assert {p["dtype"] for p in s.artifact.manifest["params"]} == {dtype, "float32"}  # norms stay fp32
    ids = list(range(3, 40))
    ref = load(compiled("llama")).logits(ids)
    got = s.logits(ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() < tol
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("spec, needle", [
    ("llvm:not-a-cpu", "not a CPU LLVM knows"),
    ("tpu", "unknown target kind"),
    ("", "empty"),
])
def test_bad_target_strings(tiny_checkpoint, tmp_path, spec, needle):
    with pytest.raises(CompileError, match=needle):
        _compile(tiny_checkpoint, tmp_path, target=spec)
    assert not (tmp_path / "m.kiln").exists()


def test_no_weights_artifact_runs_only_with_random_weights(tiny_checkpoint, tmp_path):
    from kiln.compiler.build import compile_model  # noqa: PLC0415
    from kiln.errors import ArtifactError  # noqa: PLC0415

    out = tmp_path / "nw.kiln"
    compile_model(tiny_checkpoint("llama") / "config.json", out, no_weights=True)
    assert not (out / "weights.safetensors").exists()
    with pytest.raises(ArtifactError, match="--no-weights"):
        load(out)
    s = load(out, random_weights=True)
    res = s.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True)
    assert len(res.tokens) == 4 and all(0 <= t < s.vocab_size for t in res.tokens)
    assert np.isfinite(s.logits([1, 2, 3])).all()
