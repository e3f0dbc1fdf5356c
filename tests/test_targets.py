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


@pytest.mark.parametrize(("cpu", "needs", "lacks"), [
    pytest.param("x86-64-v2", {"sse4_2", "popcnt"}, {"avx2", "avx512f"}, marks=pytest.mark.slow),
    ("x86-64-v3", {"avx2", "fma"}, {"avx512f"}),
    pytest.param("x86-64-v4", {"avx2", "avx512f", "avx512bw"}, set(), marks=pytest.mark.slow),
])
def test_explicit_cpu_target_runs_and_matches_native(tiny_checkpoint, compiled, tmp_path, cpu, needs, lacks):
    """4, 8 and 16 fp32 lanes: each whole model compiles on every host and runs
    (matching the native build) where the host has its flags; elsewhere the
    runtime refuses it before loading code, naming what is missing."""
    from kiln.errors import ArtifactError  # noqa: PLC0415
    from kiln.runtime.hostinfo import host_cpu_flags  # noqa: PLC0415

    art = _compile(tiny_checkpoint, tmp_path, target=f"llvm:{cpu}", dtype="float32")
    import json  # noqa: PLC0415

    tgt = json.loads((art / "manifest.json").read_text())["targets"][0]
    assert tgt["mcpu"] == cpu
    assert needs <= set(tgt["required_cpu_flags"]) and not lacks & set(tgt["required_cpu_flags"])
    missing = set(tgt["required_cpu_flags"]) - host_cpu_flags()
    if missing:
        with pytest.raises(ArtifactError, match=sorted(missing)[0]):
            load(art)
        return
    s = load(art)
    ids = list(range(3, 40))
    native = load(compiled("llama")).logits(ids)
    np.testing.assert_allclose(s.logits(ids), native, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
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
    ("llvm:pentium", "32-bit CPU"),  # LLVM itself aborts the process on 64-bit code for it
    ("llvm:i686", "32-bit CPU"),
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


def test_cpu_levels_parse_into_one_library_each():
    from kiln.compiler.target import library_path, parse_target  # noqa: PLC0415

    tgs = parse_target("llvm:x86-64-v2,x86-64-v3,x86-64-v4")
    assert [t.mcpu for t in tgs] == ["x86-64-v2", "x86-64-v3", "x86-64-v4"]
    assert [library_path(t, tgs) for t in tgs] == ["lib/cpu-x86-64-v2.so", "lib/cpu-x86-64-v3.so", "lib/cpu-x86-64-v4.so"]
    assert library_path(parse_target("llvm:x86-64-v3")[0], parse_target("llvm:x86-64-v3")) == "lib/cpu.so"
    with pytest.raises(CompileError, match="named twice"):
        parse_target("llvm:x86-64-v3,x86-64-v3")


@pytest.mark.slow
def test_one_artifact_for_every_x86_level_loads_the_best_this_host_runs(tiny_checkpoint, compiled, tmp_path):
    """--target llvm:x86-64-v2,x86-64-v3,x86-64-v4: one library per level; load() takes the
    level with the most flags this CPU has (never one it lacks), says which (Session.target),
    and every level the host can run gives the native build's logits; a level it lacks is
    refused by name before any code loads."""
    from kiln.errors import ArtifactError  # noqa: PLC0415
    from kiln.runtime.hostinfo import host_cpu_flags  # noqa: PLC0415

    art = _compile(tiny_checkpoint, tmp_path, target="llvm:x86-64-v2,x86-64-v3,x86-64-v4", dtype="float32")
    targets = load(art).artifact.manifest["targets"]
    assert [t["library"] for t in targets] == ["lib/cpu-x86-64-v2.so", "lib/cpu-x86-64-v3.so", "lib/cpu-x86-64-v4.so"]
    runnable = [t["mcpu"] for t in targets if set(t["required_cpu_flags"]) <= host_cpu_flags()]
    assert "x86-64-v2" in runnable
    assert load(art).target["mcpu"] == runnable[-1]  # the levels are nested: the last that fits is the best
    ids = list(range(3, 40))
    native = load(compiled("llama")).logits(ids)
    for level in ("x86-64-v2", "x86-64-v3", "x86-64-v4"):
        if level in runnable:
            s = load(art, cpu_target=level)
            assert s.target["mcpu"] == level
            np.testing.assert_allclose(s.logits(ids), native, rtol=1e-4, atol=1e-4)
        else:
            with pytest.raises(ArtifactError, match="avx512"):
                load(art, cpu_target=level)
    with pytest.raises(ArtifactError, match="no cpu library for 'znver9'"):
        load(art, cpu_target="znver9")
