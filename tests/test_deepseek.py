"""DeepSeek-V2 / V3 (issue 14): multi-head latent attention over kiln's latent cache and
DeepSeek's MoE block, from tiny random checkpoints (transformers' save_pretrained)
compiled for llvm, against transformers' float32 logits and greedy tokens.

The fixtures cover: V2 without q LoRA and group_limited_greedy routing (and V2-Lite's plain
greedy routing, which takes Mixtral's routing ops); V3 with q
LoRA, interleaved RoPE scaled by YaRN (mscale_all_dim) read past the original context,
noaux_tc routing over a non-zero e_score_correction_bias; both with a dense first
layer and shared experts (tests/helpers/models.py VARIANTS)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import hf_logits, random_ids, rel_err

from kiln.errors import KilnError

SEQ_LEN = 100  # past V3's original context of 64 (YaRN's interpolated frequencies matter), 7 pages of 16
LOGITS_RTOL = 1e-4


def test_logits_past_the_original_context_match_transformers(compiled, hf_model):
    """100 positions, past V3's original context of 64 where YaRN's interpolated frequencies
    and its softmax scale matter, over 7 pages of latent rows. (Every variant's 37-position
    logits and 24 greedy tokens: tests/test_models.py, which runs all of VARIANTS.)"""
    from kiln.runtime import load  # noqa: PLC0415

    ids = random_ids(SEQ_LEN)
    got, want = load(compiled("deepseek_v3")).logits(ids), hf_logits(hf_model("deepseek_v3"), ids)
    assert got.shape == want.shape == (SEQ_LEN, 211) and np.isfinite(got).all()
    err = rel_err(got, want)
    assert err < LOGITS_RTOL, f"relative logits error {err:.2e}"


def test_prefill_in_chunks_reads_earlier_latents(compiled):
    """A prompt prefilled 7 tokens per call (every call attends to rows that earlier calls
    appended, across page boundaries) gives the logits of one call."""
    from kiln.runtime import load  # noqa: PLC0415

    ids = random_ids(40, seed=11)
    whole = load(compiled("deepseek_v3")).logits(ids)
    chunked = load(compiled("deepseek_v3"), prefill_chunk=7).logits(ids)
    assert rel_err(chunked, whole) < 1e-5


def test_fixture_choices_matter(tiny_checkpoint, hf_model):
    """Guards on the V3 fixture: transformers' logits move far beyond the tolerance when the
    RoPE pairs are not interleaved, without YaRN, or without the score bias, so a kiln that
    got any of them wrong could not pass the test above."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    ids = random_ids(SEQ_LEN)
    model = hf_model("deepseek_v3")
    want = hf_logits(model, ids)

    def changed(**overrides):
        config = transformers.AutoConfig.from_pretrained(tiny_checkpoint("deepseek_v3"))
        for k, v in overrides.items():
            setattr(config, k, v)
        other = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
        other.load_state_dict(model.state_dict())
        return other

    assert rel_err(hf_logits(changed(rope_interleave=False), ids), want) > 100 * LOGITS_RTOL
    assert rel_err(hf_logits(changed(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), ids), want) > 100 * LOGITS_RTOL
    unbiased = changed()
    with torch.no_grad():
        for layer in unbiased.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
    assert rel_err(hf_logits(unbiased, ids), want) > 100 * LOGITS_RTOL


def test_manifest_describes_the_latent_cache(compiled, tiny_checkpoint):
    """One latent row (kv_lora_rank + qk_rope_head_dim) per token and layer, float32 codes
    + a scale; kv_b_proj kept per head as W_UK [heads, nope, kv_lora] and W_UV [heads, v, kv_lora]; kiln inspect says both sizes."""
    from kiln.runtime.artifact import open_artifact  # noqa: PLC0415

    art = compiled("deepseek_v3")
    m = json.loads((art / "manifest.json").read_text())
    cfg = json.loads((tiny_checkpoint("deepseek_v3") / "config.json").read_text())
    width = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    kv = m["kv_cache"]
    assert (kv["kind"], kv["latent_dim"], kv["code_dtype"]) == ("kiln-mla", width, "float32")
    assert kv["bytes_per_token"] == cfg["num_hidden_layers"] * (4 * width + 4)
    params = {p["name"]: p["shape"] for p in m["params"]}
    h = cfg["num_attention_heads"]
    assert params["layers.0.attn.w_uk"] == [h, cfg["qk_nope_head_dim"], cfg["kv_lora_rank"]]
    assert params["layers.0.attn.w_uv"] == [h, cfg["v_head_dim"], cfg["kv_lora_rank"]]
    assert "layers.1.mlp.e_score_correction_bias" in params and "layers.0.mlp.gate_up_proj.weight" in params
    per_head = cfg["num_hidden_layers"] * h * 4 * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] + cfg["v_head_dim"])
    lines = "\n".join(open_artifact(art).describe())
    assert f"one latent row of {width} per token and layer; per-head K and V would take {per_head / 1024:.1f} KiB/token" in lines


@pytest.mark.slow
@pytest.mark.parametrize(("kv_dtype", "max_kld"), [("int8", 1e-3), ("fp8", 2e-2)])
def test_quantized_latent_cache_stays_close(kv_dtype, max_kld, compiled, tiny_checkpoint, tmp_path):
    """--kv-dtype int8 / fp8 quantize each latent row with its own scale: mean KL divergence
    from the float cache's distributions stays small and the argmax mostly agrees
    (measured 2026-12-01: int8 KLD 5e-5, top-1 98%; fp8 0.008, 89%)."""
    from kiln.compiler.build import compile_model  # noqa: PLC0415
    from kiln.runtime import load  # noqa: PLC0415

    out = tmp_path / f"v3-{kv_dtype}.kiln"
    compile_model(tiny_checkpoint("deepseek_v3"), out, dtype="float32", kv_dtype=kv_dtype)
    assert json.loads((out / "manifest.json").read_text())["kv_cache"]["dtype"] == kv_dtype
    ids = random_ids(SEQ_LEN)
    ref, got = load(compiled("deepseek_v3")).logits(ids), load(out).logits(ids)
    lp = ref - ref.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = got - got.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    kld = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    assert 0 < kld < max_kld, kld
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.85


def _config(tiny_checkpoint, tmp_path, **changes):
    src = tiny_checkpoint("deepseek_v3")
    d = tmp_path / "ck"
    d.mkdir()
    cfg = json.loads((src / "config.json").read_text()) | changes
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not ...}))
    shutil.copy(src / "model.safetensors", d / "model.safetensors")
    return d


@pytest.mark.parametrize(("changes", "message"), [
    ({"qk_rope_head_dim": ...}, "missing required field 'qk_rope_head_dim'"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim (7) must be even"),
    ({"kv_lora_rank": -3}, "'kv_lora_rank' = -3 is outside"),
    ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported for DeepseekV3ForCausalLM"),
    ({"n_group": 3}, "n_group 3 must divide the 8 experts"),
    ({"moe_layer_freq": 2}, "moe_layer_freq 2 is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}}, "rope_scaling 'llama3' is not supported for DeepSeek"),
])
def test_bad_configs_fail_with_one_line(changes, message, tiny_checkpoint, tmp_path):
    from kiln.compiler.build import compile_model  # noqa: PLC0415

    out = tmp_path / "out.kiln"
    with pytest.raises(KilnError) as err:
        compile_model(_config(tiny_checkpoint, tmp_path, **changes), out, dtype="float32")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def _cli_compile(checkpoint, out, *flags):
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    return subprocess.run([sys.executable, "-m", "kiln.cli", "compile", str(checkpoint), "-o", str(out), "--quiet", *flags],
                          capture_output=True, text=True, timeout=900)


def test_quantized_latent_cache_on_cuda_is_refused(tiny_checkpoint, tmp_path):
    """CUDA's latent rows have the activations' dtype for now: --kv-dtype fails in one line, before any work."""
    out = tmp_path / "o.kiln"
    res = _cli_compile(tiny_checkpoint("deepseek_v3"), out, "--target", "cuda:sm_90", "--kv-dtype", "int8")
    assert res.returncode != 0 and "latent KV cache is quantized on CPU targets only for now" in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.slow
@pytest.mark.cuda
def test_cross_compiles_for_cuda(tiny_checkpoint, tmp_path):
    """kiln's CUDA MLA kernels (passes/kernels/mla_cuda.py) build with nvcc for sm_90, bf16; the
    H200 check against the CPU artifact is benchmarks/cross_device_check.py (benchmarks/NOTES.md)."""
    import shutil as sh  # noqa: PLC0415

    if sh.which("nvcc") is None or sh.which("gcc") is None:
        pytest.skip("needs nvcc and gcc")
    out = tmp_path / "v3-sm90.kiln"
    res = _cli_compile(tiny_checkpoint("deepseek_v3"), out, "--target", "cuda:sm_90", "--dtype", "bfloat16")
    assert res.returncode == 0, res.stderr[-2000:]
    kv = json.loads((out / "manifest.json").read_text())["kv_cache"]
    assert (kv["kind"], kv["code_dtype"]) == ("kiln-mla", "bfloat16")


def test_multi_token_prediction_layers_are_read_past(tiny_checkpoint):
    """V3 checkpoints carry MTP layers past num_hidden_layers (model.layers.61.* in the real
    one): conversion reads past them; any other unexpected tensor is still an error."""
    from kiln.frontends.config import ModelConfig  # noqa: PLC0415
    from kiln.frontends.hf import open_hf_checkpoint  # noqa: PLC0415
    from kiln.frontends.models import family_for  # noqa: PLC0415

    ck = open_hf_checkpoint(tiny_checkpoint("deepseek_v3"))
    config = ModelConfig.from_dict(ck.config)
    family = family_for(config.architecture)
    config = family.adapt_config(config)
    mtp = [f"model.layers.{config.num_hidden_layers}.eh_proj.weight", f"model.layers.{config.num_hidden_layers}.enorm.weight"]
    thunks = family.convert_hf(config, [*ck.tensor_names, *mtp], ck.load, ck.source)
    assert not any(".3." in k for k in thunks)
    with pytest.raises(KilnError, match="unexpected tensors model.layers.0.self_attn.k_proj.weight"):
        family.convert_hf(config, [*ck.tensor_names, "model.layers.0.self_attn.k_proj.weight"], ck.load, ck.source)


@pytest.mark.slow
def test_v3_without_interleaved_rope_matches_transformers(tiny_checkpoint, tmp_path):
    """rope_interleave false: the rope rows stay as they are (rotate-half already), the kv_b split
    still happens; logits equal transformers' for that config."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from kiln.compiler.build import compile_model  # noqa: PLC0415
    from kiln.frontends.config import ModelConfig  # noqa: PLC0415
    from kiln.frontends.models import family_for  # noqa: PLC0415
    from kiln.runtime import load  # noqa: PLC0415

    d = _config(tiny_checkpoint, tmp_path, rope_interleave=False)
    config = ModelConfig.from_dict(json.loads((d / "config.json").read_text()))
    assert family_for(config.architecture).reordered_params(config) == set()
    out = tmp_path / "plain.kiln"
    compile_model(d, out, dtype="float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    ids = random_ids(SEQ_LEN)
    assert rel_err(load(out).logits(ids), hf_logits(model, ids)) < LOGITS_RTOL


def _fp8_blocks(w: np.ndarray, bm: int, bn: int) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3's weight format: e4m3 codes and one float32 scale per bm x bn block
    (the block's max |w| / 448, as DeepSeek's own quantizer), partial edge blocks included."""
    import ml_dtypes  # noqa: PLC0415

    rows, cols = w.shape
    sc = np.zeros((-(-rows // bm), -(-cols // bn)), np.float32)
    codes = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(sc.shape[0]):
        for j in range(sc.shape[1]):
            blk = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            sc[i, j] = max(float(np.abs(blk).max()), 1e-12) / 448.0
            codes[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (blk / sc[i, j]).astype(ml_dtypes.float8_e4m3fn)
    return codes, sc


def test_fp8_block_scaled_checkpoint_loads_as_its_float_values(tiny_checkpoint, tmp_path):
    """A V3 checkpoint in DeepSeek's fp8 format (F8_E4M3 matrices + weight_scale_inv per 32 x 32
    block, edge blocks partial) compiles to the logits of the same model with the dequantized
    float weights, which transformers runs: kiln dequantizes at load, in float32, exactly."""
    import safetensors.numpy  # noqa: PLC0415

    from kiln.compiler.build import compile_model  # noqa: PLC0415
    from kiln.runtime import load  # noqa: PLC0415

    src = tiny_checkpoint("deepseek_v3")
    tensors = safetensors.numpy.load_file(str(src / "model.safetensors"))
    fp8, deq = {}, {}
    for name, w in tensors.items():
        if w.ndim == 2 and name.endswith("proj.weight"):  # the projections (and experts), as DeepSeek ships them
            codes, sc = _fp8_blocks(w.astype(np.float32), 32, 32)
            fp8[name], fp8[name + "_scale_inv"] = codes, sc
            deq[name] = codes.astype(np.float32) * np.repeat(np.repeat(sc, 32, 0), 32, 1)[: w.shape[0], : w.shape[1]]
        else:
            fp8[name] = deq[name] = w
    assert any(n.endswith("_scale_inv") for n in fp8) and any(w.shape[0] % 32 for n, w in deq.items() if n in fp8 and w.ndim == 2)
    cfg = json.loads((src / "config.json").read_text())
    for d, weights, extra in ((tmp_path / "fp8", fp8, {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                           "activation_scheme": "dynamic", "weight_block_size": [32, 32]}}),
                              (tmp_path / "deq", deq, {})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg | extra))
        safetensors.numpy.save_file(weights, str(d / "model.safetensors"))
    out = tmp_path / "fp8.kiln"
    compile_model(tmp_path / "fp8", out, dtype="float32")
    ids = random_ids(40)
    from helpers import load_hf_model  # noqa: PLC0415

    want = hf_logits(load_hf_model(tmp_path / "deq"), ids)
    assert rel_err(load(out).logits(ids), want) < LOGITS_RTOL
    assert "F8_E4M3" in json.loads((out / "manifest.json").read_text())["model"]["source_dtypes"]
    # a fp8 tensor without its scale, or without the config's block size, fails in one line
    del fp8[next(n for n in fp8 if n.endswith("_scale_inv"))]
    safetensors.numpy.save_file(fp8, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(KilnError, match=r"fp8 tensor \S+ has no \S+_scale_inv"):
        compile_model(tmp_path / "fp8", tmp_path / "bad.kiln", dtype="float32")
