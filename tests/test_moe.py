"""Mixture of experts (issue 13): the routing and expert kernels against
float64 numpy twins on odd sizes, and Mixtral / Qwen3-MoE tiny random
checkpoints (transformers' save_pretrained) compiled for llvm against
transformers' float32 logits and greedy tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import hf_greedy, hf_logits, random_ids, rel_err, slow_except

from kiln.compiler.target import parse_target
from kiln.passes.cpu_rules import CpuExpertGemv
from kiln.passes.quant import WEIGHT_FORMATS
from kiln.passes.schedule_tir import ScheduleTIR
from kiln.tvm_compat import compiler

t = compiler()
tvm, te = t.tvm, t.te

from kiln.frontends.models import moe  # noqa: E402  (TVM-at-import: after compiler())

# max |kernel - float64 twin| per output dtype of the weights it reads
TOL = {"float32": dict(rtol=2e-5, atol=2e-5), "float16": dict(rtol=2e-3, atol=2e-3)}
MOE_ARCHS = ("mixtral", "qwen3_moe", "qwen3_moe_norm")
FAST_ARCHS = ()  # the inner loop runs qwen3_moe through tests/test_models.py (logits, greedy, runtime-only load)
SEQ_LEN = 37
PROMPT_LEN = 5
NEW_TOKENS = 24
LOGITS_RTOL = 1e-4  # max |kiln - transformers| / max |transformers logit|, float32 end to end


@pytest.fixture(scope="module")
def target():
    return parse_target("llvm")[0].tvm_target()


def _build(func, target, rule=None):
    func = func.with_attr("global_symbol", "main")
    if rule is not None:
        sch = rule.apply(func, target)
        assert sch is not None, f"{type(rule).__name__} did not apply"
        mod = sch.mod
    else:
        with target:
            mod = ScheduleTIR(target)(tvm.IRModule({"main": func}))
    return tvm.compile(mod, target=target), mod["main"]


def _run(lib, arrays, out_shapes):
    dev = tvm.cpu()
    outs = [tvm.runtime.empty(s, d, dev) for s, d in out_shapes]
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in arrays], *outs)
    return [o.numpy() for o in outs]


def _rand(rng, *shape, dtype="float32"):
    return rng.standard_normal(shape).astype(dtype)


def _ids(rng, tokens, k, experts):
    """k distinct experts per token, like the router gives."""
    return np.stack([rng.permutation(experts)[:k] for _ in range(tokens)]).astype("int32")


def _loops(func) -> set:
    """The loop kinds a scheduled function uses, from its script."""
    text = func.script()
    return {kind for kind in ("parallel", "vectorized") if f"T.{kind}" in text}


# --- kernels vs float64 numpy -----------------------------------------------------
@pytest.mark.parametrize(("wdtype", "tokens", "k", "experts", "n", "kdim"), slow_except(
    [(w, *c) for w in ("float32", "float16") for c in [(1, 3, 5, 40, 72), (13, 3, 5, 24, 72), (13, 2, 4, 48, 37)]],
    ("float16", 1, 3, 5, 40, 72), ("float32", 13, 2, 4, 48, 37)))
def test_expert_matmul_matches_numpy(target, tokens, k, experts, n, kdim, wdtype):
    rng = np.random.default_rng(tokens * 100 + kdim)
    tok = tokens if tokens == 1 else t.tirx.Var("seq_len", "int64")  # decode: static 1; prefill: symbolic
    x = te.placeholder((tok, kdim), "float32", name="x")
    w = te.placeholder((experts, n, kdim), wdtype, name="w")
    ids = te.placeholder((tok, k), "int32", name="ids")
    y = moe.te_expert_matmul(x, w, ids)
    lib, func = _build(te.create_prim_func([x, w, ids, y]), target, CpuExpertGemv())
    if kdim % 2 == 0:
        assert {"parallel", "vectorized"} <= _loops(func), "expected parallel rows and vector dot products"
    xa, wa, ia = _rand(rng, tokens, kdim), _rand(rng, experts, n, kdim, dtype=wdtype), _ids(rng, tokens, k, experts)
    (got,) = _run(lib, [xa, wa, ia], [((tokens, k, n), "float32")])
    want = np.einsum("tk,tjnk->tjn", xa.astype(np.float64), wa.astype(np.float64)[ia])
    np.testing.assert_allclose(got, want, **TOL[wdtype])


@pytest.mark.parametrize(("wdtype", "tokens", "k", "experts", "d", "f"), slow_except(
    [(w, *c) for w in ("float32", "float16") for c in [(1, 3, 5, 72, 40), (13, 3, 5, 24, 44), (13, 4, 8, 24, 37)]],
    ("float16", 13, 3, 5, 24, 44), ("float32", 13, 4, 8, 24, 37)))
def test_expert_down_matches_numpy(target, tokens, k, experts, d, f, wdtype):
    rng = np.random.default_rng(tokens * 100 + f)
    tok = tokens if tokens == 1 else t.tirx.Var("seq_len", "int64")
    a = te.placeholder((tok, k, f), "float32", name="a")
    w = te.placeholder((experts, d, f), wdtype, name="w")
    ids = te.placeholder((tok, k), "int32", name="ids")
    wts = te.placeholder((tok, k), "float32", name="wts")
    y = moe.te_expert_down(a, w, ids, wts)
    lib, func = _build(te.create_prim_func([a, w, ids, wts, y]), target, CpuExpertGemv())
    if f % 2 == 0:
        assert {"parallel", "vectorized"} <= _loops(func)
    aa, wa, ia = _rand(rng, tokens, k, f), _rand(rng, experts, d, f, dtype=wdtype), _ids(rng, tokens, k, experts)
    ra = rng.uniform(0.1, 1.0, (tokens, k)).astype("float32")
    (got,) = _run(lib, [aa, wa, ia, ra], [((tokens, d), "float32")])
    want = np.einsum("tj,tjf,tjdf->td", ra.astype(np.float64), aa.astype(np.float64), wa.astype(np.float64)[ia])
    np.testing.assert_allclose(got, want, **TOL[wdtype])


def _quant_placeholders(fmt, experts, n, kdim):
    """TE placeholders for a quantized [E, N, K] stack's arrays, in parts order."""
    return tuple(te.placeholder(shp, dt, name=f"w_{sfx}") for sfx, (shp, dt) in fmt.stacked_parts((experts, n, kdim)).items())


def _quantized_stack(fmt, rng, experts, n, kdim):
    """(arrays in parts order, the float64 stack the kernel must compute with)."""
    parts = fmt.quantize_stacked(_rand(rng, experts, n, kdim) * 0.5)
    return [parts[sfx] for sfx in fmt.stacked_parts((experts, n, kdim))], fmt.dequantize_stacked(parts, (experts, n, kdim)).astype(np.float64)


# quantized experts: every weight format, decode (1 token) and prefill (13), gate/up and down
QUANT_KERNEL_CASES = [(f, *c) for f in WEIGHT_FORMATS for c in [(1, 3, 5, 40, 72), (13, 2, 4, 24, 64)]]


@pytest.mark.parametrize(("fmt_name", "tokens", "k", "experts", "n", "kdim"),
                         slow_except(QUANT_KERNEL_CASES, ("q8", 1, 3, 5, 40, 72), ("q4g32", 13, 2, 4, 24, 64),
                                                     ("q4g128", 1, 3, 5, 40, 72), ("fp8", 13, 2, 4, 24, 64)))
def test_quantized_expert_kernels_match_numpy(target, fmt_name, tokens, k, experts, n, kdim):
    """expert_matmul and expert_down over quantized stacks: only the chosen experts'
    codes are decoded, inside the reduction; against float64 numpy on the
    format's own dequantized stack."""
    fmt = WEIGHT_FORMATS[fmt_name]
    rng = np.random.default_rng(tokens * 7 + kdim)
    tok = tokens if tokens == 1 else t.tirx.Var("seq_len", "int64")
    ids = te.placeholder((tok, k), "int32", name="ids")
    ia = _ids(rng, tokens, k, experts)

    x = te.placeholder((tok, kdim), "float32", name="x")
    wq = _quant_placeholders(fmt, experts, n, kdim)
    y = moe.te_expert_matmul(x, wq, ids, fmt=fmt)
    lib, func = _build(te.create_prim_func([x, *wq, ids, y]), target, CpuExpertGemv())
    assert {"parallel", "vectorized"} <= _loops(func), "expected parallel rows and vector dot products"
    arrays, wd = _quantized_stack(fmt, rng, experts, n, kdim)
    xa = _rand(rng, tokens, kdim)
    (got,) = _run(lib, [xa, *arrays, ia], [((tokens, k, n), "float32")])
    np.testing.assert_allclose(got, np.einsum("tk,tjnk->tjn", xa.astype(np.float64), wd[ia]), **TOL["float32"])

    a = te.placeholder((tok, k, kdim), "float32", name="a")
    wts = te.placeholder((tok, k), "float32", name="wts")
    wq = _quant_placeholders(fmt, experts, n, kdim)  # down: [E, D=n, F=kdim]
    y = moe.te_expert_down(a, wq, ids, wts, fmt=fmt)
    lib, _ = _build(te.create_prim_func([a, *wq, ids, wts, y]), target, CpuExpertGemv())
    arrays, wd = _quantized_stack(fmt, rng, experts, n, kdim)
    aa, ra = _rand(rng, tokens, k, kdim), rng.uniform(0.1, 1.0, (tokens, k)).astype("float32")
    (got,) = _run(lib, [aa, *arrays, ia, ra], [((tokens, n), "float32")])
    want = np.einsum("tj,tjf,tjdf->td", ra.astype(np.float64), aa.astype(np.float64), wd[ia])
    np.testing.assert_allclose(got, want, **TOL["float32"])


def _routing_twin(logits: np.ndarray, k: int, renormalize: bool):
    """float64: softmax, top-k by a stable sort of the negated logits (ties: lower index first)."""
    lg = logits.astype(np.float64)
    p = np.exp(lg - lg.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    ids = np.argsort(-lg, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, axis=1)
    return ids, (w / w.sum(axis=1, keepdims=True) if renormalize else w)


@pytest.mark.parametrize(("renormalize", "tokens", "experts", "k"), slow_except(
    [(r, *c) for r in (True, False) for c in [(1, 8, 2), (13, 8, 3), (13, 37, 5)]], (True, 13, 37, 5), (False, 13, 8, 3)))
def test_routing_matches_numpy_with_ties(target, tokens, experts, k, renormalize):
    """Top-k with ties: equal logits go to the lower expert index (on every target: the
    rank is computed, never left to a sort's stability)."""
    rng = np.random.default_rng(experts + k)
    logits = rng.standard_normal((tokens, experts)).astype("float32")
    # ties on purpose: per token, some experts share the best, a middle, and the worst logit
    for i in range(tokens):
        a, b, c, d = rng.permutation(experts)[:4]
        logits[i, b] = logits[i, a] = logits[i].max() + 0.5
        logits[i, d] = logits[i, c]
    tok = tokens if tokens == 1 else t.tirx.Var("seq_len", "int64")
    lg = te.placeholder((tok, experts), "float32", name="logits")
    ids = moe.te_topk_experts(lg, k)
    wts = moe.te_routing_weights(lg, ids, renormalize)
    lib, _ = _build(te.create_prim_func([lg, ids, wts]), target)
    got_ids, got_w = _run(lib, [logits], [((tokens, k), "int32"), ((tokens, k), "float32")])
    want_ids, want_w = _routing_twin(logits, k, renormalize)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_w, want_w, **TOL["float32"])


# --- whole models vs transformers -------------------------------------------------


@pytest.mark.parametrize("arch", slow_except(MOE_ARCHS, *FAST_ARCHS))
def test_logits_and_greedy_match_transformers(arch, compiled, hf_model):
    """Logits at 37 positions (prefill) and 24 greedy tokens (decode: one token
    per call, expert ids never leave the device) equal transformers'."""
    from kiln.runtime import SamplingParams, load  # noqa: PLC0415

    session = load(compiled(arch))
    ids = random_ids(SEQ_LEN)
    got, want = session.logits(ids), hf_logits(hf_model(arch), ids)
    assert got.shape == want.shape == (SEQ_LEN, 211) and np.isfinite(got).all()
    err = rel_err(got, want)
    assert err < LOGITS_RTOL, f"{arch}: relative logits error {err:.2e}"
    prompt = random_ids(PROMPT_LEN, seed=7)
    res = session.generate(prompt, max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0), ignore_eos=True)
    assert res.tokens == hf_greedy(hf_model(arch), prompt, NEW_TOKENS)


def test_manifest_counts_every_expert(compiled, tiny_checkpoint):
    """The artifact holds every expert (stacked per layer) and the dense layer's MLP;
    the manifest counts all parameters and those one token reads."""
    manifest = json.loads((compiled("qwen3_moe") / "manifest.json").read_text())
    params = {p["name"]: p["shape"] for p in manifest["params"]}
    cfg = json.loads((tiny_checkpoint("qwen3_moe") / "config.json").read_text())
    e, f, d = cfg["num_local_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]  # (Qwen3-MoE's num_experts, as saved)
    assert params["layers.0.mlp.experts.gate_up"] == [e, 2 * f, d]
    assert params["layers.0.mlp.experts.down"] == [e, d, f]
    assert params["layers.0.mlp.gate.weight"] == [e, d]
    assert params["layers.1.mlp.gate_up_proj.weight"] == [2 * cfg["intermediate_size"], d]  # mlp_only_layers=[1]
    model = manifest["model"]
    assert model["num_params"] == sum(int(np.prod(s)) for s in params.values())
    # one sparse layer: a token skips E - k of its experts (kiln inspect --json shows both counts)
    assert model["num_active_params"] == model["num_params"] - (e - cfg["num_experts_per_tok"]) * 3 * f * d
    from kiln.runtime.artifact import open_artifact  # noqa: PLC0415

    lines = open_artifact(compiled("qwen3_moe")).describe()
    assert any(line.startswith(f"  active   {model['num_active_params'] / 1e6:.2f}M params per token") for line in lines), lines
    # bytes one decode step reads: float32 active params, of the (untied) embedding table one row
    read = 4 * (model["num_active_params"] - (cfg["vocab_size"] - 1) * d)
    assert any(line.endswith(f"{read / 1e6:.2f} MB of weights read per decoded token") for line in lines), lines


def test_routing_choices_matter(tiny_checkpoint, hf_model):
    """Guards on the fixtures: tokens go to different experts, and renormalising
    the top-k weights or not changes transformers' logits far beyond the tolerance
    (else the tests above could pass with a wrong routing)."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    ids = random_ids(SEQ_LEN)
    model = hf_model("qwen3_moe")
    with torch.no_grad():
        logits = model.model.layers[0].mlp.gate(model.model.embed_tokens(torch.tensor(ids)))[0]
    chosen = torch.topk(logits, model.config.num_experts_per_tok, dim=-1).indices
    assert len(set(chosen.flatten().tolist())) == model.config.num_experts, "every expert is used by some token"
    config = transformers.AutoConfig.from_pretrained(tiny_checkpoint("qwen3_moe"))
    config.norm_topk_prob = not config.norm_topk_prob
    flipped = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager",
                                                            experts_implementation="eager").eval()
    flipped.load_state_dict(model.state_dict())
    assert rel_err(hf_logits(flipped, ids), hf_logits(model, ids)) > 100 * LOGITS_RTOL


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_fused_expert_layout_converts_alike(arch, tiny_checkpoint, tmp_path):
    """transformers 5 keeps experts fused in memory (mlp.experts.gate_up_proj [E, 2F, D],
    down_proj [E, D, F]; Mixtral's router under mlp.gate); a checkpoint written in
    that layout converts to the same kiln params as save_pretrained's per-expert one."""
    import safetensors.torch  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from kiln.frontends.config import ModelConfig  # noqa: PLC0415
    from kiln.frontends.hf import open_hf_checkpoint  # noqa: PLC0415
    from kiln.frontends.models import family_for  # noqa: PLC0415

    src = tiny_checkpoint(arch)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((src / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    safetensors.torch.save_file(state, str(fused / "model.safetensors"))

    def convert(path):
        ck = open_hf_checkpoint(path)
        config = ModelConfig.from_dict(ck.config)
        family = family_for(config.architecture)
        config = family.adapt_config(config)
        return {k: f() for k, f in family.convert_hf(config, ck.tensor_names, ck.load, ck.source).items()}

    a, b = convert(src), convert(fused)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.cuda
def test_moe_cross_compiles_for_cuda(tiny_checkpoint, tmp_path):
    """The routing and expert kernels compile for CUDA too (dlight's generic GPU
    rules for now; kiln's own CUDA MoE kernels are the next milestone)."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if shutil.which("nvcc") is None or shutil.which("gcc") is None:
        pytest.skip("needs nvcc and gcc")
    out = tmp_path / "mixtral-sm90.kiln"
    res = subprocess.run([sys.executable, "-m", "kiln.cli", "compile", str(tiny_checkpoint("mixtral")), "-o", str(out),
                          "--target", "cuda:sm_90", "--dtype", "bfloat16", "--quiet"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text())["model"]["num_active_params"] > 0
