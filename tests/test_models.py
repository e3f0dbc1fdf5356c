"""Every architecture against transformers: a tiny random checkpoint, compiled
for llvm in float32, must give transformers' logits at every position and its
greedy tokens exactly; and the runtime must run where the TVM compiler cannot
load."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import ARCHS, compile_artifact, hf_greedy, hf_logits, random_ids, rel_err, slow_except

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from kiln.runtime import SamplingParams, load  # noqa: E402

SEQ_LEN = 37
PROMPT_LEN = 5
NEW_TOKENS = 24
# max |kiln - transformers| / max |transformers logit|, float32 end to end
LOGITS_RTOL = 1e-4
# the inner loop (`-m "not slow"`) compiles these two; CI every architecture. qwen3_moe
# stands in for qwen3: its layer 1 is a dense Qwen3 layer, its layer 0 a sparse MoE one
FAST_ARCHS = ("llama", "qwen3_moe")


@pytest.mark.parametrize("arch", slow_except(ARCHS, *FAST_ARCHS))
def test_logits_match_transformers(arch, compiled, hf_model):
    ids = random_ids(SEQ_LEN)
    got = load(compiled(arch)).logits(ids)
    want = hf_logits(hf_model(arch), ids)
    assert got.shape == want.shape == (SEQ_LEN, 211)
    assert np.isfinite(got).all()
    err = rel_err(got, want)
    worst = int(np.abs(got - want).max(axis=1).argmax())
    assert err < LOGITS_RTOL, f"{arch}: relative logits error {err:.2e} (worst at position {worst})"


@pytest.mark.parametrize("arch", slow_except(ARCHS, *FAST_ARCHS))
def test_greedy_matches_transformers(arch, compiled, hf_model):
    prompt = random_ids(PROMPT_LEN, seed=7)
    res = load(compiled(arch)).generate(prompt, max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0), ignore_eos=True)
    assert res.tokens == hf_greedy(hf_model(arch), prompt, NEW_TOKENS)
    assert res.finish_reason == "length"


@pytest.mark.parametrize("arch", slow_except(["llama_tied_rope3", "gemma3", "phi3"], "llama_tied_rope3"))
def test_chunked_prefill_matches_transformers(arch, compiled, hf_model):
    """Prefill in chunks of 8: later chunks attend to earlier ones through the
    paged KV cache, at RoPE positions past the chunk start (Gemma 3 and Phi-3:
    RoPE in the graph, at the cache's query positions)."""
    from kiln.runtime.artifact import open_artifact  # noqa: PLC0415
    from kiln.runtime.session import Session  # noqa: PLC0415

    ids = random_ids(SEQ_LEN)
    got = Session(open_artifact(compiled(arch)), prefill_chunk=8).logits(ids)
    assert rel_err(got, hf_logits(hf_model(arch), ids)) < LOGITS_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("page_size", [64])
def test_page_size_matches_transformers(page_size, tiny_checkpoint, hf_model, tmp_path):
    """--page-size 64: decode crosses page boundaries (5 + 80 tokens) and chunked
    prefill reads earlier 64-token pages; both must still give transformers' results."""
    from kiln.runtime.artifact import open_artifact  # noqa: PLC0415
    from kiln.runtime.session import Session  # noqa: PLC0415

    arch = "llama"
    art = compile_artifact(tiny_checkpoint(arch), tmp_path / "p.kiln", page_size=page_size)
    assert json.loads((art / "manifest.json").read_text())["kv_cache"]["page_size"] == page_size
    prompt = random_ids(PROMPT_LEN, seed=7)
    res = load(art).generate(prompt, max_new_tokens=80, sampling=SamplingParams(temperature=0), ignore_eos=True)
    assert res.tokens == hf_greedy(hf_model(arch), prompt, 80)
    ids = random_ids(150)
    got = Session(open_artifact(art), prefill_chunk=40).logits(ids)
    assert rel_err(got, hf_logits(hf_model(arch), ids)) < LOGITS_RTOL


@pytest.mark.slow
def test_windowed_artifact_refuses_forks(compiled):
    """Forked sequences came out wrong with sliding-window layers (TVM's fork does not carry
    their window state): refused, as is the server's prefix cache, which forks."""
    from kiln.errors import RequestError  # noqa: PLC0415
    from kiln.runtime.engine import Engine  # noqa: PLC0415

    s = load(compiled("gemma3_window"), max_sequences=3)
    assert (s.window, s.prefill_chunk) == (8, 7)
    seq = s.add_sequence()
    s.prefill(seq, random_ids(20))
    with pytest.raises(RequestError, match="sliding-window"):
        s.fork_sequence(seq, 16)
    with pytest.raises(RequestError, match="sliding-window"):
        Engine(s, prefix_cache=1)


def test_page_size_is_checked(tiny_checkpoint, tmp_path):
    from kiln.compiler.build import compile_model  # noqa: PLC0415
    from kiln.errors import CompileError  # noqa: PLC0415

    with pytest.raises(CompileError, match="--page-size 48"):
        compile_model(tiny_checkpoint("llama"), tmp_path / "x.kiln", page_size=48)
    assert not (tmp_path / "x.kiln").exists()


def test_rope_scaling_is_exercised(tiny_checkpoint, hf_model):
    """Guard on the fixtures themselves: at these sizes, llama3 and linear
    scaling must change transformers' logits, or the tests above prove nothing."""
    import transformers  # noqa: PLC0415

    ids = random_ids(SEQ_LEN)
    for arch in ("llama_tied_rope3", "llama_rope_linear"):
        scaled = hf_model(arch)
        config = transformers.AutoConfig.from_pretrained(tiny_checkpoint(arch))
        config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
        plain.load_state_dict(scaled.state_dict())
        assert rel_err(hf_logits(plain, ids), hf_logits(scaled, ids)) > 100 * LOGITS_RTOL, arch


def test_gemma3_and_phi3_rope_is_exercised(tiny_checkpoint, hf_model):
    """Guard on the fixtures: Gemma 3's two RoPE bases (and linear scaling on full layers),
    its score scale, its window of 8 (gemma3_window), and Phi-3's LongRoPE factors must each
    change transformers' logits."""
    import transformers  # noqa: PLC0415

    ids = random_ids(SEQ_LEN)
    plain_rope = {"rope_type": "default", "rope_theta": 10000.0}
    changes = {
        "gemma3": [dict(rope_parameters={"sliding_attention": plain_rope, "full_attention": plain_rope}),
                   dict(query_pre_attn_scalar=24)],
        "phi3": [dict(rope_parameters=plain_rope)],
        "gemma3_window": [dict(sliding_window=256)],
    }
    for arch, edits in changes.items():
        for edit in edits:
            config = transformers.AutoConfig.from_pretrained(tiny_checkpoint(arch))
            for k, v in edit.items():
                setattr(config, k, v)
            other = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
            other.load_state_dict(hf_model(arch).state_dict())
            assert rel_err(hf_logits(other, ids), hf_logits(hf_model(arch), ids)) > 100 * LOGITS_RTOL, (arch, edit)


# --- the runtime without the compiler ------------------------------------------
# Whole packages, and (trailing dot) the submodules of one. `tvm.script` itself
# cannot be blocked: TVM 0.27's own tvm/__init__.py imports it unconditionally,
# also runtime-only; what must never load is its parser and IR builders.
BLOCKED = ("torch", "transformers", "tvm.relax", "tvm.s_tir", "tvm.script.")

RUNTIME_ONLY_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys
    BLOCKED = {blocked!r}
    SHADOW = {shadow!r}

    def blocked(name):
        return any(name.startswith(b) if b.endswith(".") else name == b or name.startswith(b + ".") for b in BLOCKED)

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if blocked(name):
                raise ImportError(f"{{name}} is not available on a runtime-only machine")
            return None

    sys.meta_path.insert(0, Block())

    from kiln.runtime import SamplingParams, load

    s = load({artifact!r})
    res = s.generate({prompt!r}, max_new_tokens={n}, sampling=SamplingParams(temperature=0), ignore_eos=True)

    import tvm, tvm.base, tvm.libinfo, tvm_ffi.libinfo
    assert tvm.__file__.startswith(SHADOW), tvm.__file__
    try:
        found = tvm_ffi.libinfo._find_library_by_basename("tvm", "tvm_compiler", tvm.libinfo.package_lib_paths())
    except RuntimeError:
        found = None
    assert found is None, f"the shadow tvm still finds {{found}}"
    assert "tvm_compiler" not in tvm.base._LOADED_LIBS, tvm.base._LOADED_LIBS
    assert tvm.base._RUNTIME_ONLY
    leaked = sorted(m for m in sys.modules if blocked(m))
    assert not leaked, leaked
    print(json.dumps(res.tokens))
    """
)


def shadow_tvm(dest: Path) -> Path:
    """A copy of the installed `tvm` package made of symlinks, without
    lib/libtvm_compiler.so; returns the directory to put on PYTHONPATH."""
    src = Path(importlib.util.find_spec("tvm").submodule_search_locations[0])
    root = dest / "tvm"
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel = Path(dirpath).relative_to(src)
        (root / rel).mkdir(parents=True, exist_ok=True)
        for f in filenames:
            if rel == Path("lib") and f == "libtvm_compiler.so":
                continue
            (root / rel / f).symlink_to(Path(dirpath) / f)
    assert (root / "lib" / "libtvm_runtime.so").exists() and not (root / "lib" / "libtvm_compiler.so").exists()
    return dest


def test_runtime_without_compiler_library(compiled, tmp_path):
    arch = "qwen3_moe"
    artifact = compiled(arch)
    prompt = random_ids(PROMPT_LEN, seed=7)
    want = load(artifact).generate(prompt, max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0), ignore_eos=True).tokens

    shadow = shadow_tvm(tmp_path / "shadow")
    script = RUNTIME_ONLY_SCRIPT.format(blocked=BLOCKED, shadow=str(shadow), artifact=str(artifact), prompt=prompt, n=NEW_TOKENS)
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_USE_RUNTIME_LIB", "TVM_LIBRARY_PATH", "PYTHONPATH")}
    env["PYTHONPATH"] = str(shadow)
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == want
